"""Every Python example in the README runs as written."""
import re

import pytest

from conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_example_prints_the_same_numbers_in_two_fresh_processes(index, tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "example.py"
    script.write_text(BLOCKS[index])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ONEBIT_THREADS")}
    outs = []
    for run in ("first", "second"):  # each in a folder of its own: an example may write a run directory
        (tmp_path / run).mkdir()
        outs.append(subprocess.run([sys.executable, str(script)], cwd=tmp_path / run, env=env, capture_output=True,
                                   text=True, timeout=900))
    assert all(p.returncode == 0 for p in outs), outs[0].stderr[-2000:]
    timings = re.compile(r"\d+(\.\d+)? s\b")  # wall-clock seconds are the only thing allowed to differ
    assert timings.sub("<s>", outs[0].stdout) == timings.sub("<s>", outs[1].stdout)
