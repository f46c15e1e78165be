import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_param_store():
    import pyro

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


def run_cli(*overrides, cwd, timeout=300):
    """Run `python run.py overrides...` in cwd (outputs land there); return the CompletedProcess. The process is
    forked from one that has imported torch, Pyro, Hydra and ArviZ (tests/zygote.py)."""
    import zygote

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return zygote.run([sys.executable, str(ROOT / "run.py"), *overrides], cwd=cwd, env=env, timeout=timeout)
