"""The optuna sweeper ends as the other sweeps do (cli.optuna_sweep): failed trials, a sweep with no best value, a
repeated trial, and optuna's own log lines."""
import json
import logging

import pytest
from conftest import run_cli

from cli.optuna_sweep import FailedTrialLines, repeated_trial

JOB = ["data.n=5", "train.steps=100", "eval.samples=10000", "eval.replicates=4", "eval.figures=false",
       "hydra/sweeper=optuna", "hydra.sweeper.n_jobs=1"]


def _record(text: str) -> logging.LogRecord:
    return logging.LogRecord("hydra_plugins.hydra_optuna_sweeper._impl", logging.WARNING, __file__, 0, text, None, None)


def test_the_sweepers_line_about_a_failed_jobs_none_is_dropped():
    assert not FailedTrialLines().filter(_record("Failed experiment: Return value must be float-castable. Got 'None'."))
    assert FailedTrialLines().filter(_record("Best value: 1.25"))


def test_the_sweepers_line_counting_failures_against_max_failure_rate_is_dropped():
    line = ("Failed [ValueError(\"Return value must be float-castable. Got 'None'.\")] times out of 2 with "
            "max_failure_rate=0.0.")
    assert not FailedTrialLines().filter(_record(line))  # the sweep itself stops and says why (ending_sweep)


def _status(path, mode="MULTIRUN", **status):
    """A job dir as a sweep leaves it (.hydra/hydra.yaml says MULTIRUN; a lone run's says RUN), with its status."""
    (path / ".hydra").mkdir(parents=True, exist_ok=True)
    (path / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  mode: {mode}\n")
    (path / "status.json").write_text(json.dumps(status))
    return path


@pytest.fixture
def under_optuna(monkeypatch):
    import cli.rundirs

    monkeypatch.setattr(cli.rundirs, "failed_value", lambda sweeper=None: None)


def test_a_repeated_trial_of_a_job_that_ended_ok_gets_its_loss(tmp_path, under_optuna):
    assert repeated_trial(_status(tmp_path / "job", status="ok", loss=1.25)) == (1.25,)


def test_a_repeated_trial_of_a_job_that_diverged_fails_again(tmp_path, under_optuna, capsys):
    assert repeated_trial(_status(tmp_path / "job", status="diverged", reason="training diverged")) == (None,)
    assert "which ended 'diverged': it fails again" in capsys.readouterr().err


def test_a_job_dir_still_running_or_empty_is_no_repeated_trial(tmp_path, under_optuna):
    assert repeated_trial(_status(tmp_path / "job", status="running", pid=1)) is None
    assert repeated_trial(tmp_path / "nothing") is None


def test_a_lone_runs_dir_is_no_repeated_trial_its_config_may_be_another(tmp_path, under_optuna):
    assert repeated_trial(_status(tmp_path / "job", mode="RUN", status="ok", loss=1.25)) is None


def test_outside_optuna_a_finished_job_dir_is_no_repeated_trial(tmp_path):
    assert repeated_trial(_status(tmp_path / "job", status="ok", loss=1.25)) is None


def test_an_optuna_sweep_reuses_a_repeated_trials_result_and_prints_none_of_optunas_own_lines(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    r = run_cli("-m", *JOB, "optim.lr=choice(0.001)", "hydra.sweeper.n_trials=2", "hydra.sweep.dir=s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "its loss" in r.stdout and "is reused, not retrained" in r.stdout
    assert len(list((tmp_path / "s").glob("*/status.json"))) == 1
    best = (tmp_path / "s" / "optimization_results.yaml").read_text()
    loss = json.loads(next((tmp_path / "s").glob("*/metrics.json")).read_text())["loss"]
    assert f"best_value: {loss}" in best
    assert "setup plugin" not in r.stdout + r.stderr and "\x1b[" not in r.stdout + r.stderr


def test_an_optuna_sweep_whose_every_trial_failed_ends_in_one_line_without_a_best_value(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    r = run_cli("-m", *JOB, "optim.lr=choice(1000)", "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failure_rate=1.0",
                "hydra.sweep.dir=s", cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert "stopped: the optuna sweep has no best value: every trial failed" in r.stderr
    assert "best_value: null" in (tmp_path / "s" / "optimization_results.yaml").read_text()
    assert (tmp_path / "s" / "summary.md").exists()


def test_an_optuna_sweep_stops_at_a_batch_above_max_failure_rate(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    r = run_cli("-m", *JOB, "optim.lr=choice(1000)", "hydra.sweeper.n_trials=3", "hydra.sweep.dir=s", cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert "stopped: the optuna sweep stopped early" in r.stderr and "max_failure_rate=0.0" in r.stderr
    assert r.stdout.count("Launching 1 jobs") == 1  # the first failed batch was the last
    assert "failed: " in r.stderr and (tmp_path / "s" / "summary.md").exists()
    results = (tmp_path / "s" / "optimization_results.yaml").read_text()
    assert "best_value: null" in results and "stopped early (hydra.sweeper.max_failure_rate): no trial" in results


@pytest.mark.parametrize("setting, line", [
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0 is not allowed: hydra.sweeper.n_trials must be an integer"),
    ("hydra.sweeper.n_jobs=0", "hydra.sweeper.n_jobs=0 is not allowed"),
    ("hydra.sweeper.max_failure_rate=2", "hydra.sweeper.max_failure_rate=2.0 is not allowed: "
                                         "hydra.sweeper.max_failure_rate must be a number in [0, 1]"),
    ("hydra.sweeper.max_failure_rate=abc", "hydra.sweeper.max_failure_rate=abc is not allowed"),
    ("hydra.sweeper.direction=[minimize,maximize]", "hydra.sweeper.direction=['minimize', 'maximize'] is not "
                                                    "allowed: hydra.sweeper.direction must be minimize or maximize"),
    ("+hydra.sweeper.foo=1", "hydra.sweeper.foo is not a setting of the optuna sweeper (it has sampler,"),
    ("+hydra.sweeper.sampler.foo=1", "hydra.sweeper.sampler.foo is not a setting of the optuna.samplers.TPESampler"),
    ("hydra.sweeper.sampler.seed=-1", "hydra.sweeper.sampler.seed=-1 is not allowed"),
    ("hydra.sweeper.custom_search_space=nowhere.fn", "hydra.sweeper.custom_search_space='nowhere.fn' is not allowed"),
], ids=["n_trials", "n_jobs", "rate", "rate_type", "two_directions", "unknown", "sampler_key", "sampler_seed",
        "custom_search_space"])
def test_a_bad_optuna_sweeper_setting_is_refused_in_one_line_naming_it(setting, line):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from cli.state import ConfigError
    from cli.sweeper import check_sweeper

    with pytest.raises(ConfigError) as err:
        check_sweeper(sweep_config("hydra/sweeper=optuna", "optim.lr=choice(0.001)", setting))
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def sweep_config(*overrides):
    """The config a sweep's preflight checks (its first job's values; a value Hydra cannot merge, as the preflight
    reports it: cli.keys.composition_error)."""
    from cli.checks import _first_values
    from cli.keys import compose_config, composition_error

    try:
        return compose_config(_first_values(list(overrides)), hydra_cfg=True)
    except Exception as err:  # noqa: BLE001
        raise composition_error(err) from None


def test_a_bad_optuna_sweeper_setting_exits_2_before_the_sweep_starts(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    r = run_cli("-m", *JOB, "optim.lr=choice(0.001)", "hydra.sweeper.n_trials=0", "hydra.sweep.dir=s", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: hydra.sweeper.n_trials=0 is not allowed"), r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "s").exists()


@pytest.mark.parametrize("setting, line", [
    ("optim.lr=interval(1,0)", "The `low` value must be smaller than or equal to the `high` value"),
    ("hydra.sweeper.storage=bogus://x", "Can't load plugin: sqlalchemy.dialects:bogus"),
], ids=["search_space", "storage"])
def test_a_search_space_or_setting_optuna_refuses_before_any_trial_is_one_line_without_a_sweep_dir(tmp_path, setting,
                                                                                                     line):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    r = run_cli("-m", *JOB, "optim.lr=choice(0.001)", setting, "hydra.sweep.dir=s", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: the optuna sweeper refused the sweep before any trial: ") and line in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "s").exists()


def test_a_sweep_stopped_early_records_the_best_trial_that_completed(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # seed 2: TPE suggests 0.001 three times, then 1000 (which diverges and stops the sweep)
    r = run_cli("-m", *JOB, "optim.lr=choice(0.001,1000)", "hydra.sweeper.n_trials=6", "hydra.sweeper.sampler.seed=2",
                "hydra.sweep.dir=s", cwd=tmp_path)
    assert r.returncode == 1 and "stopped: the optuna sweep stopped early" in r.stderr, r.stderr
    from omegaconf import OmegaConf

    results = OmegaConf.load(tmp_path / "s" / "optimization_results.yaml")
    loss = json.loads(next((tmp_path / "s").glob("*optim.lr=0.001*/metrics.json")).read_text())["loss"]
    assert results.best_value == loss and "optim.lr=0.001" in results.best_overrides
    assert "the best of the trials that completed" in results.note
