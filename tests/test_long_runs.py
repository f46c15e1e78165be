"""A training that will run long says so once, after its first steps, with the time it will take; the command
line's progress lines say how long is left, and its warnings are one log line each."""
import importlib
import logging
import warnings

import pytest

from guides import GaussianGuide
from infer import fit
from infer.result import duration, long_run_warning
from models import VAE, OneBit

result_module = importlib.import_module("infer.result")


def train(steps=40, **kw):
    model = VAE(5, hidden=8)
    return fit(model, GaussianGuide(model, hidden=8), OneBit(5), steps=steps, log_every=10, seed=0, **kw)


def long_warnings(record):
    return [str(w.message) for w in record if "training will take" in str(w.message)]


def test_a_training_that_will_run_long_says_so_once_after_its_first_steps(monkeypatch):
    monkeypatch.setattr(result_module, "LONG_RUN_SECONDS", 0.0)  # any training counts as long
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train()
    said = long_warnings(record)
    assert len(said) == 1
    assert "30 steps at" in said[0] and "timed over the first 10" in said[0]


def test_a_stack_of_replicas_that_will_run_long_says_so_once(monkeypatch):
    from infer.fit_replicas import fit_replicas

    monkeypatch.setattr(result_module, "LONG_RUN_SECONDS", 0.0)
    models = [VAE(5, hidden=8) for _ in range(2)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit_replicas(models, [GaussianGuide(m, hidden=8) for m in models], OneBit(5), [0, 1], steps=40, log_every=10)
    assert len(long_warnings(record)) == 1


def test_a_short_training_says_nothing_of_its_length():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train()
    assert not long_warnings(record)


@pytest.mark.parametrize("done,elapsed,left,expected", [
    (10, 1.0, 100, None),                # 10 s to go
    (10, 10.0, 14000, "about 3.9 h"),     # 1 s a step
    (10, 2.0, 10000, "about 33 min"),
])
def test_the_warning_names_the_time_left_in_the_units_people_read(done, elapsed, left, expected):
    said = long_run_warning(done, elapsed, left)
    assert (said is None) if expected is None else (expected in said)


def test_durations_read_as_seconds_minutes_or_hours():
    assert [duration(s) for s in (42, 719, 7300)] == ["42 s", "12 min", "2.0 h"]


def test_the_command_lines_progress_line_says_how_long_is_left(caplog):
    from cli.job import heartbeat

    beat = heartbeat(1000, every=0.0)
    with caplog.at_level(logging.INFO, logger="onebit"):
        beat(100, {"loss": 1.0})
        beat(200, {"loss": 0.9})
    lines = [r.getMessage() for r in caplog.records]
    assert "left" not in lines[0] and lines[1].startswith("  step 200/1000") and lines[1].endswith(" left")


def test_a_jobs_warnings_are_one_log_line_each(caplog, capsys):
    from cli.job import warnings_logged

    with caplog.at_level(logging.WARNING, logger="onebit"), warnings_logged(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("fit: something the user should know")
    assert [r.getMessage() for r in caplog.records] == ["fit: something the user should know"]
    assert "UserWarning" not in capsys.readouterr().err
