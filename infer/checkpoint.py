"""Checkpoints: params, optimiser state, RNG states, step, history and the partial logging window, saved with
torch.save (atomically, with the file mode of any other output) and checked on load; the RNG and buffer state a
checkpoint holds (rng_state, module_buffers), and fit's `resume` argument read as a checkpoint (resume_state)."""
import glob
import io
import os
import random
import warnings

import numpy as np
import pyro
import torch

from .checkpoint_check import CheckpointError, check_checkpoint, zip_damage
from .files import write_atomic
from .validate import is_int, refuse, shown

KEYS = ("params", "optimizer", "rng", "step")


def module_buffers(model, guide) -> dict:
    """{'model.<name>' | 'guide.<name>': tensor}: the buffers of model and guide (those that are nn.Modules). They
    are state that is not a param, e.g. the random permutation and masks of an AutoIAFNormal, drawn when the guide
    is first run, so a resumed run must restore them."""
    return {f"{role}.{name}": buf for role, module in (("model", model), ("guide", guide))
            if isinstance(module, torch.nn.Module) for name, buf in module.named_buffers()}


def rng_state() -> dict:
    """The states of torch's, numpy's and Python's global RNGs (and CUDA's, once initialised)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() and torch.cuda.is_initialized()
               else {})}


def set_rng_state(state: dict) -> None:
    """Put the global RNGs into the states rng_state() recorded."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _temp_pattern(path) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.*.tmp")


# a checkpoint's own entries (save_checkpoint): fit's checkpoint_extra may not take their names
OWN_KEYS = ("params", "optimizer", "rng", "step", "history", "window", "initial_loss", "buffers", "average", "fit",
            "wall_seconds", "engine")


def storable(value) -> bool:
    """Whether torch.load(weights_only=True) reads `value` back, once plain(): None, bools, numbers, strings,
    tensors, and dicts (with such keys), lists and tuples of them."""
    value = plain(value)
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and storable(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(storable(v) for v in value)
    return False


def plain(value):
    """value with numpy and 0-dim torch numbers as the Python numbers they equal, through dicts, lists and tuples:
    what torch.load(weights_only=True) reads back (it refuses numpy scalars)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic) or isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def save_checkpoint(path, result, extra=None, rng=None, window=None, params=None, optimizer_state=None,
                    average=None) -> None:
    """Write the current param store values, the model's and guide's buffers, result.optimizer's state, the RNG
    states (or `rng`, a state from rng_state()), result.steps, result.history, the partial logging window
    (`window`, else result.window) and result.initial_loss to path, plus the entries of `extra` (e.g. the config).

    The file is written to a temporary file beside path and renamed into place, so an interrupted save never
    corrupts it; temporary files that an earlier killed save left behind are removed first. The file gets the mode
    any other new file gets (0666 less the umask), not tempfile's 0600. `params` ({name: tensor}) and
    `optimizer_state` (a state_dict) replace the param store's values and result.optimizer's state (a replica's
    checkpoint: infer.fit_replicas writes what a single run with its seed would). `average` is the running
    parameter average inside an averaging window (infer.average.ParameterAverage.state())."""
    store = pyro.get_param_store()
    if params is None:
        params = {name: store.get_param(name).unconstrained() for name in store.keys()}
    state = {"params": {name: value.detach().cpu().clone() for name, value in params.items()},
             "optimizer": optimizer_state if optimizer_state is not None else result.optimizer.state_dict(),
             "rng": rng if rng is not None else rng_state(),
             "step": result.steps, "history": list(result.history),
             "window": window if window is not None else getattr(result, "window", None),
             "initial_loss": getattr(result, "initial_loss", None),
             "buffers": {k: v.detach().cpu().clone() for k, v in result.buffers.items()},
             **({"average": average} if average is not None else {}),
             **({"fit": plain(result.recipe)} if isinstance(getattr(result, "recipe", None), dict) else {}),
             **({"wall_seconds": float(result.wall_seconds)}  # the training time so far: a resume adds to it
                if isinstance(getattr(result, "wall_seconds", None), (int, float)) else {}),
             **({"engine": result.engine}  # the path(s) that trained so far: a resume on another adds it
                if isinstance(getattr(result, "engine", None), str) else {}),
             **plain(extra or {})}
    for orphan in glob.glob(_temp_pattern(path)):  # left by a save that was killed between write and rename
        try:
            os.remove(orphan)
        except OSError:
            pass
    buffer = io.BytesIO()  # torch's zip writer turns a full disk into a C++ RuntimeError: written by Python, it is
    torch.save(state, buffer)  # one OSError (ENOSPC) naming the file
    write_atomic(path, buffer.getbuffer())


def _numpy_globals() -> list:
    """What torch.load(weights_only=True) must be allowed to rebuild for numpy's RNG state (an ndarray of uint32)."""
    multiarray = getattr(np, "_core", None) or np.core
    return [np.ndarray, np.dtype, multiarray.multiarray._reconstruct, type(np.dtype(np.uint32))]


def load_checkpoint(path, label: str = None) -> dict:
    """Read a checkpoint written by save_checkpoint (torch.load with weights_only: tensors, numbers, strings and
    numpy's RNG state; nothing that runs code), once every member of its zip matches its CRC-32 (zip_damage), and
    check every entry it returns (check_checkpoint); raise
    CheckpointError with a one-line reason otherwise, naming `label` (the argument or config key that gave the
    path, e.g. 'train.resume'), the path and the bad entry."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"path={shown(path)} is not allowed: path must be a checkpoint file's path (str or "
                              "pathlib.Path)")
    where = f"{label}={path}" if label else f"checkpoint {path}"
    if os.path.isdir(path):
        raise CheckpointError(f"{where} is a directory, not a checkpoint file: name the file, e.g. "
                              f"{os.path.join(path, 'checkpoint.pt')}")
    if not os.path.isfile(path):  # a device or a fifo (/dev/null) exists, and is no checkpoint file either
        raise CheckpointError(f"{where} is not a file, but a device, fifo or socket: name a checkpoint file"
                              if os.path.exists(path) else f"{where} does not exist")
    damage = zip_damage(path)
    if damage:
        raise CheckpointError(f"{where} is damaged: {damage}; it cannot be resumed: resume another checkpoint, or "
                              "start afresh")
    try:
        with torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():  # a checkpoint holds
            # tensors, numbers, strings and numpy's RNG state, and runs no code when read; torch's warnings about
            # a file that is not its own (a plain pickle) would come before the one line that says so
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        if "unsupported global" in str(err).lower():  # a pickle of other objects: loading it could run any code
            raise CheckpointError(f"{where} is not a checkpoint this project wrote: it holds Python objects of other "
                                  "kinds (not loaded: reading them could run code)") from None
        raise CheckpointError(f"{where} is not a readable torch file ({type(err).__name__})") from None
    if not isinstance(state, dict) or any(k not in state for k in KEYS):
        have = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        lacks = ", ".join(k for k in KEYS if not isinstance(state, dict) or k not in state)
        raise CheckpointError(f"{where} lacks {lacks} (has {have})")
    check_checkpoint(state, where)
    return state


def resume_state(resume) -> dict:
    """fit's `resume` as a checkpoint dict: None stays None, a path (str or os.PathLike) is read with
    infer.checkpoint.load_checkpoint, a dict must hold what resuming needs (checkpoint.KEYS); ValueError in one
    line otherwise."""
    if resume is None:
        return None
    if isinstance(resume, (str, os.PathLike)):
        try:
            return load_checkpoint(resume)
        except ValueError as err:  # its message starts with "checkpoint <path>": the path is named once, here
            why = str(err).removeprefix(f"checkpoint {resume}").lstrip(": ")
            raise refuse("resume", os.fspath(resume), f"resume must be a readable checkpoint ({why})") from None
    lacks = [k for k in KEYS if not isinstance(resume, dict) or k not in resume]
    if lacks or not is_int(resume["step"]) or resume["step"] < 0:
        raise refuse("resume", resume, "resume must be a checkpoint dict (infer.checkpoint.load_checkpoint(path)) "
                                       "or its path" + (f"; this one lacks {', '.join(lacks)}" if lacks else
                                                        "; its step is not an integer >= 0"))
    check_checkpoint(resume, "resume")  # every entry as save_checkpoint writes it (rng states, params, ...)
    return resume

