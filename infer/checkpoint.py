"""Checkpoints: params, optimiser state, RNG states and step, saved with torch.save and checked on load."""
import os
import tempfile

import pyro
import torch

from .fit import rng_state

KEYS = ("params", "optimizer", "rng", "step")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or lacks what resuming needs."""


def save_checkpoint(path, result, extra=None) -> None:
    """Write the current param store values, the model's and guide's buffers, result.optimizer's state, the RNG
    states and result.steps to path.
    The file is written beside path and renamed into place, so an interrupted save never corrupts it."""
    store = pyro.get_param_store()
    state = {"params": {name: store.get_param(name).unconstrained().detach().clone() for name in store.keys()},
             "optimizer": result.optimizer.state_dict(), "rng": rng_state(), "step": result.steps,
             "history": result.history, "buffers": {k: v.detach().clone() for k, v in result.buffers.items()},
             **(extra or {})}
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as tmp:
        torch.save(state, tmp)
    os.replace(tmp.name, path)


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by save_checkpoint; raise CheckpointError with a one-line reason otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {path} is not a readable torch file ({type(err).__name__})") from None
    if not isinstance(state, dict) or any(k not in state for k in KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(k for k in KEYS if not isinstance(state, dict) or k not in state)} (has {have})")
    return state
