"""The tests' command lines run forked from a process that has imported the third-party libraries
(tests/zygote.py): what they see is what a fresh interpreter gives."""
import json
import os
import sys

import zygote
from conftest import ROOT
from test_cli_integrity import TINY

TIMINGS = ("wall_seconds", "eval_seconds")


def both(tmp_path, *overrides):
    """The same command line forked from the zygote and in a fresh interpreter: (forked, fresh) CompletedProcess
    and run dir."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = []
    for name, fresh in (("forked", False), ("fresh", True)):
        proc = zygote.run([sys.executable, str(ROOT / "run.py"), *overrides, f"hydra.run.dir={name}"], tmp_path,
                          env, 300, fresh=fresh)
        out.append((proc, tmp_path / name))
    return out


def test_a_forked_run_writes_a_fresh_interpreters_numbers_and_history_bit_for_bit(tmp_path):
    (forked, a), (fresh, b) = both(tmp_path, *TINY)
    assert forked.returncode == fresh.returncode == 0, forked.stderr + fresh.stderr
    assert (a / "history.csv").read_bytes() == (b / "history.csv").read_bytes()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ma.items() if k not in TIMINGS} == {k: v for k, v in mb.items() if k not in TIMINGS}


def test_a_forked_refusal_prints_a_fresh_interpreters_line_and_exit_code(tmp_path):
    (forked, _), (fresh, _) = both(tmp_path, "data.n=-1")
    assert forked.returncode == fresh.returncode == 2
    assert forked.stderr == fresh.stderr and forked.stdout == fresh.stdout
