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


def but(overrides, *keys) -> list:
    """overrides without those of the given keys: for a sweep that sweeps one of them (a key given as one value and
    swept is refused)."""
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keys]


def overwrite_in_member(path, member: str = "data/0", count: int = 640, byte: bytes = b"A") -> str:
    """Overwrite `count` bytes (at most the member's size) in the middle of the zip member of the torch file at path
    whose name ends with /`member` (torch names them <archive>/data/0, ...), leaving its zip directory and CRC-32
    as written: damage torch.load does not notice. Returns the member's full name."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(f"/{member}"))
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        name, extra = struct.unpack("<HH", f.read(30)[26:30])  # the local header: 30 bytes, then name and extra
        count = min(count, info.file_size)
        f.seek(info.header_offset + 30 + name + extra + (info.file_size - count) // 2)
        f.write(byte * count)
    return info.filename
