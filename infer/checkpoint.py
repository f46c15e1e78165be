"""Checkpoints: params, optimiser state, RNG states, step, history and the partial logging window, saved with
torch.save (atomically, with the file mode of any other output) and checked on load."""
import glob
import os
import tempfile

import pyro
import torch

KEYS = ("params", "optimizer", "rng", "step")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or lacks what resuming needs."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_pattern(path) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.*.tmp")


def save_checkpoint(path, result, extra=None, rng=None, window=None, params=None, optimizer_state=None,
                    average=None) -> None:
    """Write the current param store values, the model's and guide's buffers, result.optimizer's state, the RNG
    states (or `rng`, a state from infer.fit.rng_state), result.steps, result.history, the partial logging window
    (`window`, else result.window) and result.initial_loss to path, plus the entries of `extra` (e.g. the config).

    The file is written to a temporary file beside path and renamed into place, so an interrupted save never
    corrupts it; temporary files that an earlier killed save left behind are removed first. The file gets the mode
    any other new file gets (0666 less the umask), not tempfile's 0600. `params` ({name: tensor}) and
    `optimizer_state` (a state_dict) replace the param store's values and result.optimizer's state (a replica's
    checkpoint: infer.fit_replicas writes what a single run with its seed would). `average` is the running
    parameter average inside an averaging window (infer.average.ParameterAverage.state())."""
    from .fit import rng_state

    store = pyro.get_param_store()
    if params is None:
        params = {name: store.get_param(name).unconstrained() for name in store.keys()}
    state = {"params": {name: value.detach().cpu().clone() for name, value in params.items()},
             "optimizer": optimizer_state if optimizer_state is not None else result.optimizer.state_dict(), "rng": rng if rng is not None else rng_state(),
             "step": result.steps, "history": list(result.history),
             "window": window if window is not None else getattr(result, "window", None),
             "initial_loss": getattr(result, "initial_loss", None),
             "buffers": {k: v.detach().cpu().clone() for k, v in result.buffers.items()},
             **({"average": average} if average is not None else {}),
             **(extra or {})}
    for orphan in glob.glob(_temp_pattern(path)):  # left by a save that was killed between write and rename
        try:
            os.remove(orphan)
        except OSError:
            pass
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by save_checkpoint; raise CheckpointError with a one-line reason otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        from .validate import shown

        raise CheckpointError(f"path={shown(path)} is not allowed: path must be a checkpoint file's path (str or "
                              "pathlib.Path)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {path} is not a readable torch file ({type(err).__name__})") from None
    if not isinstance(state, dict) or any(k not in state for k in KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        lacks = ", ".join(k for k in KEYS if not isinstance(state, dict) or k not in state)
        raise CheckpointError(f"checkpoint {path} lacks {lacks} (has {have})")
    return state
