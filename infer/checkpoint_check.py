"""What a checkpoint must hold to be resumed: check_checkpoint raises CheckpointError (one line naming the entry)
unless every entry has the type and shape infer.checkpoint.save_checkpoint writes, its tensors finite and its RNG
states restorable; zip_damage says which member of a checkpoint file has bytes changed since it was written."""
import math
import random
import zipfile

import numpy as np
import torch

from .validate import is_int, shown


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or lacks what resuming needs."""


def zip_damage(path) -> str:
    """Why a checkpoint file in torch's zip format is damaged: the first member whose bytes do not match the CRC-32
    its zip directory records, or a zip structure that cannot be read; '' where every member matches, or where the
    file is no zip (torch.load judges it then). torch.load checks no CRC: bytes overwritten inside a tensor load as
    other numbers. One streaming pass over the file (about 0.6 s for the 770 MB of a checkpoint at n = 1e6)."""
    if not zipfile.is_zipfile(path):
        return ""
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.testzip()
    except Exception as err:  # noqa: BLE001  a damaged directory or header: zipfile raises several types
        return f"its zip directory or headers cannot be read ({type(err).__name__})"
    return f"its member {member} does not match the CRC-32 it was written with, so its bytes changed" if member else ""


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
    last = 0
    for i, row in enumerate(history):
        if not (isinstance(row, dict) and all(isinstance(k, str) for k in row)):
            return f"row {i} is not a dict of named values"
        step = row.get("step")
        if not (is_int(step) and step >= 0):
            return f"row {i}'s step is {shown(step)}, not an integer >= 0"
        if step <= last:
            return f"row {i}'s step {step} does not follow the step before it ({last})"
        last = step
        missing = [k for k in ("lr", "loss") if k not in row]
        if missing:
            return f"row {i} has no {missing[0]} (a row fit logs holds step, lr, the loss terms and loss)"
        odd = [k for k, v in row.items() if not (v is None or isinstance(v, (int, float, str)))]
        if odd:
            return f"row {i}'s {odd[0]} is a {type(row[odd[0]]).__name__}, not a number"
        for key in ("lr", "loss"):  # a logged row's learning rate and loss: finite numbers (a diverged run logs none)
            v = row[key]
            if key == "loss" and row.get("beta") == 0 and isinstance(v, float) and math.isnan(v):
                continue  # a window trained at beta 0 measured no KL, so no loss (infer.result.Window.row)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                return f"row {i}'s {key} is {shown(v)}, not a finite number"
    return ""


def logged_every(state: dict):
    """The log_every a checkpoint's run logged with: its fit settings' (FitResult.recipe), else its config's
    (train.log_every); None where it records neither (an older version's)."""
    for entry, key in (("fit", "log_every"), ("config", "train.log_every")):
        every = state.get(entry).get(key) if isinstance(state.get(entry), dict) else None
        if is_int(every) and every >= 1:
            return int(every)
    return None


def history_gap(history: list, step: int, every: int) -> str:
    """Why `history` (rows with increasing steps up to `step`, as _history_problem checks) is not what fit logs up to
    `step` with log_every `every` ('' where it is): a row at every multiple of `every` (the mean of the window of
    steps since the row before), and other rows only where a session's step budget ended between two multiples (its
    partial window). One pass over the rows: a step of 10**9 costs no more than a short one."""
    multiples = [row["step"] for row in history if row["step"] % every == 0]
    for i in range(min(len(multiples) + 1, step // every)):
        if i == len(multiples) or multiples[i] != (i + 1) * every:
            return (f"has no row at step {(i + 1) * every}: fit logs one every log_every={every} steps up to the "
                    f"checkpoint's step {step} (and one where a step budget ends between them)")
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
    if not bool(torch.isfinite(values).all()) or not all(math.isfinite(b) for b in betas):
        return "holds non-finite values or betas (the steps since the last log of a run that trained)"
    return ""


def check_checkpoint(state: dict, where: str) -> None:
    """Raise CheckpointError (one line, starting with `where`, naming the entry) unless every entry resuming reads
    has the type and shape save_checkpoint writes: params {name: float tensor}, all finite; optimizer a state_dict
    (its moments finite); rng the torch, numpy and python generators' states (each restorable); step an integer
    >= 0; history a list of rows with increasing integer steps up to step, each with its lr and loss, one at every
    multiple of its log_every (history_gap); window None or a (k, T) tensor with k betas, one per step since the
    last row; initial_loss None or a number; fit None or a dict; buffers {name: tensor};
    average None or {start, count (integers >= 0, start + count = step), means (finite float tensors)}; config a
    dict."""
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
    if not why and state.get("history") and state["history"][-1]["step"] > step:
        why = f"ends at step {state['history'][-1]['step']}, after the checkpoint's step {step}"
    if not why and logged_every(state) is not None:
        why = history_gap(state.get("history", []), step, logged_every(state))
    if why:
        bad("history", why)
    why = _window_problem(state.get("window"))
    window = state.get("window")
    since = step - (state["history"][-1]["step"] if state.get("history") else 0)
    if not why and window is not None:  # the steps since the last logged row, one window row each
        if window["values"].shape[0] != since:
            why = (f"holds {window['values'].shape[0]} steps, where the checkpoint's step {step} is {since} past the "
                   "last logged row")
    elif not why and "window" in state and since:  # fit writes None only for an empty window: just after a row
        why = f"is empty, where the checkpoint's step {step} is {since} past the last logged row"
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
    if average is not None and not average["start"] < step == average["start"] + average["count"]:
        bad("average", f"counts {average['count']} averaged steps after step {average['start']}, where the "
                       f"checkpoint's step is {step}: fit's running mean holds every step from its start on")
    if average is not None:
        nonfinite = _non_finite(dict(enumerate(average["means"])))
        if nonfinite:
            bad("average", f"holds non-finite means (mean {nonfinite[0][0]}: {nonfinite[0][1]} of {nonfinite[0][2]} "
                           "are nan or inf)")
    fit = state.get("fit")
    scalar = (type(None), bool, int, float, str)
    if fit is not None and not (isinstance(fit, dict) and all(
            isinstance(v, scalar) or isinstance(v, (list, tuple)) and all(isinstance(e, scalar) for e in v)
            for v in fit.values())):
        bad("fit", "is not a dict of the settings fit trained with (numbers, strings, or tuples of numbers)")
    if "config" in state and state["config"] is not None and not isinstance(state["config"], dict):
        bad("config", f"is a {type(state['config']).__name__}, not a dict")
