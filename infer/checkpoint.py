"""Checkpoints: params, optimiser state, RNG states, step, history and the partial logging window, saved with
torch.save (atomically, with the file mode of any other output) and checked on load; the RNG and buffer state a
checkpoint holds (rng_state, module_buffers), and fit's `resume` argument read as a checkpoint (resume_state)."""
import glob
import os
import random
import tempfile

import numpy as np
import pyro
import torch

from .validate import is_int, refuse, shown

KEYS = ("params", "optimizer", "rng", "step")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or lacks what resuming needs."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def _tensor_dict(value, floating: bool = True) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and (v.is_floating_point() or not floating)
        for k, v in value.items())


def _non_finite(tensors) -> list:
    """(name, count, size) of every floating tensor in {name: tensor} holding a nan or an inf."""
    out = []
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                out.append((name, bad, value.numel()))
    return out


def _rng_problem(rng):
    """Why `rng` is not an RNG state set_rng_state can restore ('' if it is): each generator's state is
    loaded into a fresh generator of its kind (the global ones are not touched)."""
    if not isinstance(rng, dict) or any(k not in rng for k in ("torch", "numpy", "python")):
        have = sorted(map(str, rng)) if isinstance(rng, dict) else type(rng).__name__
        return f"is not a dict of the torch, numpy and python generators' states (it is {have})"
    try:
        torch.Generator().set_state(rng["torch"])
    except Exception as err:  # noqa: BLE001  TypeError or RuntimeError, as torch decides
        return f"torch state cannot be restored ({type(err).__name__})"
    try:
        np.random.RandomState().set_state(rng["numpy"])
    except Exception as err:  # noqa: BLE001
        return f"numpy state cannot be restored ({type(err).__name__})"
    try:
        random.Random().setstate(rng["python"])
    except Exception as err:  # noqa: BLE001
        return f"python state cannot be restored ({type(err).__name__})"
    cuda = rng.get("cuda")
    if cuda is not None and not (isinstance(cuda, (list, tuple)) and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)):
        return "cuda states are not a list of byte tensors"
    return ""


def _optimizer_problem(state) -> str:
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in state["param_groups"])):
        return "is not an optimizer state_dict ({'state': {...}, 'param_groups': [{'params': [...], ...}]})"
    for key, moments in state["state"].items():
        if not isinstance(moments, dict):
            return f"entry {key!r} is not a dict of tensors"
        bad = _non_finite(moments)
        if bad:
            return f"entry {key!r} holds non-finite values ({bad[0][0]}: {bad[0][1]} of {bad[0][2]})"
    return ""


def _history_problem(history) -> str:
    if not isinstance(history, list):
        return f"is not a list of rows (it is {type(history).__name__})"
    for i, row in enumerate(history):
        if not (isinstance(row, dict) and all(isinstance(k, str) for k in row)):
            return f"row {i} is not a dict of named values"
        step = row.get("step")
        if not (is_int(step) and step >= 0):
            return f"row {i}'s step is {shown(step)}, not an integer >= 0"
        odd = [k for k, v in row.items() if not (v is None or isinstance(v, (int, float, str)))]
        if odd:
            return f"row {i}'s {odd[0]} is a {type(row[odd[0]]).__name__}, not a number"
    return ""


def _window_problem(window) -> str:
    if window is None:
        return ""
    if not isinstance(window, dict) or not isinstance(window.get("values"), torch.Tensor) or not isinstance(
            window.get("betas"), (list, tuple)):
        return "is not None or {'values': a (k, T) tensor, 'betas': k numbers}"
    values, betas = window["values"], window["betas"]
    if values.dim() != 2 or not values.is_floating_point() or values.shape[0] != len(betas) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
        return (f"values (shape {tuple(values.shape)}) and betas ({len(betas)}) do not make a window: a (k, T) "
                "float tensor and k numbers")
    return ""


def check_checkpoint(state: dict, where: str) -> None:
    """Raise CheckpointError (one line, starting with `where`, naming the entry) unless every entry resuming reads
    has the type and shape save_checkpoint writes: params {name: float tensor}, all finite; optimizer a state_dict
    (its moments finite); rng the torch, numpy and python generators' states (each restorable); step an integer
    >= 0; history a list of rows with integer steps; window None or a (k, T) tensor with k betas; initial_loss None
    or a number; buffers {name: tensor}; average None or {start, count (integers >= 0), means (finite float
    tensors)}; config a dict."""
    def bad(entry, why, hint="it cannot be resumed: resume another checkpoint, or start afresh"):
        raise CheckpointError(f"{where}: its {entry} entry {why}; {hint}")

    step = state["step"]
    if not (is_int(step) and step >= 0):
        bad("step", f"is {shown(step)}, not an integer >= 0")
    if not _tensor_dict(state["params"]):
        bad("params", "is not a dict of {name: float tensor}")
    nonfinite = _non_finite(state["params"])
    if nonfinite:
        name, count, size = nonfinite[0]
        bad("params", f"holds non-finite values ({name}: {count} of {size} are nan or inf"
            + (f"; {len(nonfinite) - 1} more params too" if len(nonfinite) > 1 else "") + ")",
            "a diverged run's checkpoint cannot be resumed: resume an earlier checkpoint, or start afresh")
    why = _optimizer_problem(state["optimizer"])
    if why:
        bad("optimizer", why)
    why = _rng_problem(state["rng"])
    if why:
        bad("rng", why)
    why = _history_problem(state.get("history", []))
    if why:
        bad("history", why)
    why = _window_problem(state.get("window"))
    if why:
        bad("window", why)
    initial = state.get("initial_loss")
    if initial is not None and not (isinstance(initial, (int, float)) and not isinstance(initial, bool)):
        bad("initial_loss", f"is {shown(initial)}, not None or a number")
    if not _tensor_dict(state.get("buffers", {}), floating=False):
        bad("buffers", "is not a dict of {name: tensor}")
    average = state.get("average")
    if average is not None and not (isinstance(average, dict) and all(
            is_int(average.get(k)) and average.get(k) >= 0 for k in ("start", "count"))
            and isinstance(average.get("means"), list)
            and all(isinstance(m, torch.Tensor) and m.is_floating_point() for m in average["means"])):
        bad("average", "is not None or {'start': an integer >= 0, 'count': an integer >= 0, 'means': [float "
                       "tensors]}")
    if average is not None:
        nonfinite = _non_finite(dict(enumerate(average["means"])))
        if nonfinite:
            bad("average", f"holds non-finite means (mean {nonfinite[0][0]}: {nonfinite[0][1]} of {nonfinite[0][2]} "
                           "are nan or inf)")
    if "config" in state and state["config"] is not None and not isinstance(state["config"], dict):
        bad("config", f"is a {type(state['config']).__name__}, not a dict")


def load_checkpoint(path, label: str = None) -> dict:
    """Read a checkpoint written by save_checkpoint and check every entry it returns (check_checkpoint); raise
    CheckpointError with a one-line reason otherwise, naming `label` (the argument or config key that gave the
    path, e.g. 'train.resume'), the path and the bad entry."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"path={shown(path)} is not allowed: path must be a checkpoint file's path (str or "
                              "pathlib.Path)")
    where = f"{label}={path}" if label else f"checkpoint {path}"
    if os.path.isdir(path):
        raise CheckpointError(f"{where} is a directory, not a checkpoint file: name the file, e.g. "
                              f"{os.path.join(path, 'checkpoint.pt')}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{where} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged file
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

