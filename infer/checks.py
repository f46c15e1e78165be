"""Input checks of fit and the evaluation functions: each raises ValueError in one line, naming the argument and
what is allowed, before any work.

check_inputs(model, guide, data) is what every evaluation function runs (data, model and guide built for its n, the
guide over the model's latent sites); inputs_checked skips it inside a caller that already ran it. check_arguments
is fit's (and fit_replicas') check of all its arguments; the per-argument rules are infer.validate's table.
"""
import contextlib
import contextvars
import numbers
import os
import warnings

import torch

from guides.check import check_guide
from .checkpoint_check import CheckpointError, history_gap, logged_every
from .validate import check, check_decay, check_warmup, is_int, refuse, shown


def checked_device(device):
    """torch.device(device), checked to exist on this machine (ValueError in one line otherwise)."""
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not allowed: device must be a torch device such as 'cpu' or "
                         "'cuda'") from None
    if device.type == "meta":  # meta tensors hold no data: the model would be moved there, its params lost
        raise ValueError("device='meta' is not allowed: meta tensors hold no values to train; device must be a "
                         "device with memory, such as 'cpu' or 'cuda'")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"device={str(device)!r} is not available on this machine ({first}); use device='cpu'")\
            from None
    return device


def check_sizes(data, **roles) -> None:
    """Raise ValueError (one line) if a model or guide (keyword: its role) was built for another n than the data."""
    for role, fn in roles.items():
        n = getattr(fn, "n", None)
        if is_int(n) and n != data.n:
            raise ValueError(f"{role} was built for n={n} but the data have n={data.n}: build the {role} with "
                             f"n={data.n}")


def check_data(data) -> None:
    """Raise ValueError (one line, naming data) unless data is the one-bit data distribution: a models.OneBit, or
    an object like it (an integer n, the (2, n) tensor x of the two points, their weights w and weights)."""
    ok = False
    if not isinstance(data, type) and is_int(getattr(data, "n", None)) and hasattr(data, "weights"):
        try:
            x, w = data.x, data.w
            ok = (torch.is_tensor(x) and torch.is_tensor(w) and x.dim() == 2 and x.shape[-1] == data.n
                  and w.shape == x.shape[:1])
        except Exception:  # noqa: BLE001  an object whose x or w cannot be read is not data
            ok = False
    if not ok:
        raise refuse("data", data, "data must be the one-bit data distribution, models.OneBit(n) (or an object "
                                   "with n, x (2, n), w (2,) and weights)")
    if x.is_floating_point() and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError("data.x is not allowed: its values must be bits, 0 or 1 (the Bernoulli likelihood's "
                         f"support); this one holds e.g. {shown(x[(x != 0) & (x != 1)][:3].tolist())}")
    if not (w.is_floating_point() and bool(torch.isfinite(w).all()) and bool((w > 0).all())
            and abs(float(w.double().sum()) - 1.0) <= 1e-6):
        raise ValueError(f"data.w={shown(w.tolist())} is not allowed: data.w must be the two points' weights, two "
                         "positive finite numbers that sum to 1")


def check_callable(name, fn, what, count: int = None) -> None:
    """Refuse fn (one line) unless it is callable (a class is not) and, with `count`, can be called with `count`
    positional arguments (when its signature can be read; a builtin's may not)."""
    import inspect

    if isinstance(fn, type) or not callable(fn):
        raise refuse(name, fn, f"{name} must be {what}")
    if count is None:
        return
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*range(count))
    except TypeError as err:
        raise refuse(name, fn, f"{name} must be {what} ({err})") from None


_CHECKED = contextvars.ContextVar("inputs_checked", default=())  # the (model, guide, data) triples checked by the
# enclosing inputs_checked() blocks


def check_inputs(model, guide, data) -> None:
    """The checks every evaluation function runs before any work (analysis.report.evaluate, analysis.exact's
    exact, surgery, evidence and posterior_grid, analysis.montecarlo.monte_carlo, analysis.iwae.iwae,
    analysis.psis.khat): data is the one-bit data (check_data), model and guide are callables built for its n
    (check_sizes), and the guide samples exactly the model's latent sites, with the same shapes and plates, inside
    their support, with a density (guides.check.check_guide: one trace of each, on a forked RNG, so the caller's
    RNG is untouched). Raises ValueError (or its subclass GuideMismatchError) in one line. Inside
    `with inputs_checked(model, guide, data):` (evaluate's, after its own check) it does nothing."""
    if already_checked(model, guide, data):
        return
    check_data(data)
    check_callable("model", model, "a Pyro model, a callable model(x) (e.g. models.VAE(n))")
    check_callable("guide", guide, "a Pyro guide, a callable guide(x) over the model's latent sites (e.g. "
                                    "guides.GaussianGuide(model))")
    check_sizes(data, model=model, guide=guide)
    with torch.random.fork_rng():  # the check's draws leave the caller's RNG alone
        check_guide(model, guide, data.x)


def already_checked(model, guide, data) -> bool:
    """Whether these very objects (by identity) are inside an inputs_checked block: check_inputs skips them."""
    return any(m is model and g is guide and d is data for m, g, d in _CHECKED.get())


@contextlib.contextmanager
def inputs_checked(model, guide, data):
    """Within it, check_inputs(model, guide, data) for these very objects (by identity) is skipped: they were
    checked once. Blocks nest; leaving one, by an exception too, restores the enclosing block's triples."""
    token = _CHECKED.set(_CHECKED.get() + ((model, guide, data),))
    try:
        yield
    finally:
        _CHECKED.reset(token)


def _folder_exists(path) -> bool:
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    return os.path.isdir(folder) and not os.path.isdir(os.fspath(path))


def check_checkpoint_path(path, name: str = "checkpoint_path") -> None:
    """Raise ValueError (one line) unless path is None or a file path (str or os.PathLike) in a folder that exists:
    a checkpoint that cannot be written must be refused before training, not at its first write."""
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) in ("", b""):
        raise refuse(name, path, f"{name} must be a file path (str or pathlib.Path), or None")
    if os.path.isdir(path):
        raise refuse(name, os.fspath(path), f"{name} must be a file path, and this is a folder (name a file in it, "
                                            f"e.g. {os.path.join(os.fspath(path), 'checkpoint.pt')!r})")
    if not _folder_exists(path):
        raise refuse(name, os.fspath(path), f"{name} must be a file in a folder that exists (create "
                                            f"{os.path.dirname(os.path.abspath(os.fspath(path)))!r} first)")
    import tempfile

    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:  # the checkpoint is written as a temporary file in its folder, then renamed (infer.checkpoint)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".onebit-probe."):
            pass
    except OSError as err:
        raise refuse(name, os.fspath(path), f"{name} must be a file in a folder this process can write ({folder}: "
                                            f"{err.strerror or err})") from None


def _check_elbo(elbo) -> None:
    from pyro.infer import ELBO

    if isinstance(elbo, type) or not (isinstance(elbo, ELBO) or callable(getattr(elbo, "marginal_terms", None))):
        what = "a class; instantiate it" if isinstance(elbo, type) else "not an objective"
        raise refuse("elbo", elbo, f"elbo must be an objective instance, a Pyro ELBO such as "
                                   f"infer.ClosedFormELBO() or pyro.infer.Trace_ELBO(), or "
                                   f"infer.marginal.MarginalLikelihood() (this is {what})")


def check_arguments(model, guide, data, elbo, steps, resume, values, callback=None, checkpoint_path=None,
                     checkpoint_extra=None):
    """fit's (and each replica's) checks of its arguments, ValueError in one line naming the first bad one; data is
    not checked here: the caller checks it first (check_data, in fit before resume). Once checked, a numpy scalar in
    `values` is replaced, in place, by the Python number it equals (fit seeds Python's RNG, which refuses numpy
    integers, and its recipe goes into metrics.json)."""
    for name, value in values.items():
        check(name, value)
    check_decay(values["lr"], values["lr_final"], values["schedule"])
    check_warmup(values["warmup"], values["warmup_start"])
    _check_elbo(elbo)
    check_callable("model", model, "a Pyro model, a callable model(x) (e.g. models.VAE(n))")
    if callback is not None:
        check_callable("callback", callback, "a callable callback(step, row), or None", 2)
    check_checkpoint_path(checkpoint_path)
    if checkpoint_extra is not None and not isinstance(checkpoint_extra, dict):
        raise refuse("checkpoint_extra", checkpoint_extra, "checkpoint_extra must be a dict of entries to add to "
                                                           "every checkpoint, or None")
    if checkpoint_extra:
        from .checkpoint import OWN_KEYS, storable

        for key, value in checkpoint_extra.items():
            if key in OWN_KEYS:
                raise refuse("checkpoint_extra", {key: "..."}, f"checkpoint_extra may not hold {key!r}: a checkpoint's "
                                                                f"own entries are {', '.join(OWN_KEYS)}")
            if not isinstance(key, str) or not storable(value):
                raise refuse(f"checkpoint_extra[{key!r}]", value, "checkpoint_extra's entries must be named by strings "
                                                                  "and hold None, bools, numbers, strings, tensors, or "
                                                                  "dicts, lists and tuples of them (what a checkpoint "
                                                                  "reads back)")
    needs_guide = getattr(elbo, "needs_guide", True)
    if needs_guide and guide is None:
        raise ValueError("guide=None is not allowed: this objective needs a guide (only an objective with "
                         "needs_guide = False, such as the exact marginal likelihood, trains without one)")
    if needs_guide:
        check_callable("guide", guide, "a Pyro guide, a callable guide(x) over the model's latent sites (e.g. "
                                        "guides.GaussianGuide(model))")
    if not needs_guide:
        for name, default in (("beta", 1.0), ("warmup", 0), ("freeze_model", False)):
            if values[name] != default:
                raise ValueError(f"{name}={values[name]!r} is not allowed with objective {type(elbo).__name__}: it "
                                 f"trains the model alone by its marginal likelihood ({name} must be {default!r})")
    check_sizes(data, model=model, guide=guide if needs_guide else None)
    for name, value in values.items():  # numpy scalars as the Python numbers they equal (Python's RNG takes no
        if isinstance(value, numbers.Integral) and type(value) not in (int, bool):  # numpy int as a seed; a
            values[name] = int(value)  # checkpoint's torch.load(weights_only=True) refuses any numpy number)
        elif isinstance(value, numbers.Real) and type(value) not in (float, int, bool):
            values[name] = float(value)
        elif isinstance(value, (list, tuple)) and any(type(v) not in (float, int, bool) for v in value):
            values[name] = type(value)(float(v) if isinstance(v, numbers.Real) else v for v in value)
    if resume is not None:
        start = int(resume["step"])
        if steps < start:
            raise ValueError(f"steps={steps} is not allowed: the checkpoint is at step {start}, and steps must be at "
                             f"least that (it is the total step budget, not the steps still to run)")
        check_resume_settings(resume, values, elbo)


# what decides a training trajectory and what its history means: fit refuses a resume that changes one of them
# (steps may change: the lr schedule then changes, and fit warns); the command line's cli.resume.TRAJECTORY. Adam's
# betas are checked against the checkpoint's optimizer state itself (infer.prepare.restore), older files too.
TRAJECTORY = ("lr", "lr_final", "schedule", "beta", "warmup", "warmup_start", "average", "objective",
              "num_particles", "noise", "free_bits", "closed_form", "vectorize_particles",
              "log_every", "freeze_model", "nodes", "inner_nodes", "seed")
# seed: a resume restores its checkpoint's RNG states, so it continues the checkpoint's seed whatever fit is given:
# another seed is refused (its run was labelled with a seed it never trained with); None takes the checkpoint's


def elbo_recipe(elbo) -> dict:
    """What a fit's recipe records of its objective (and a resume checks against its checkpoint's): the ELBO's class,
    particles, noise, free bits, ClosedFormELBO's closed_form, whether a Pyro ELBO vectorises its particles (the
    command line's always do), and objective=exact's lattice (nodes, inner_nodes)."""
    return {"objective": type(elbo).__name__, "num_particles": getattr(elbo, "num_particles", None),
            "noise": getattr(elbo, "noise", None), "free_bits": getattr(elbo, "free_bits", 0.0),
            "closed_form": getattr(elbo, "closed_form", None),
            "vectorize_particles": getattr(elbo, "vectorize_particles", None),
            **{k: getattr(elbo, k) for k in ("nodes", "inner_nodes") if isinstance(getattr(elbo, k, None), int)}}


def check_resume_settings(resume, values, elbo) -> None:
    """Raise ValueError (one line, naming each setting with the checkpoint's value and this fit's) where the
    checkpoint records the fit settings it was trained with (its 'fit' entry, FitResult.recipe) and this fit would
    change one that decides the trajectory (TRAJECTORY): it would no longer continue the run it resumes. A changed
    step budget is allowed (warn_budget_change). A checkpoint without the entry (an older version's) is not checked,
    but its history must be the rows this fit's log_every logs (checkpoint_check.history_gap): CheckpointError."""
    if logged_every(resume) is None:  # an older version's checkpoint: its history must be what this fit logs
        why = history_gap(resume.get("history") or [], int(resume["step"]), values["log_every"])
        if why:
            raise CheckpointError(f"resume: its history entry {why}; it cannot be resumed: resume another checkpoint, "
                                  "or start afresh")
    saved = resume.get("fit")
    if not isinstance(saved, dict):
        return
    now = {**{k: values[k] for k in TRAJECTORY if k in values}, **elbo_recipe(elbo)}
    if now.get("seed") is None:  # the checkpoint's seed, as its RNG states restore it
        now.pop("seed", None)
    differ = [k for k in TRAJECTORY if k in saved and saved[k] != now.get(k, saved[k] if k == "seed" else None)]
    if differ:
        shown_ = ", ".join(f"{k}={saved[k]!r} (this fit: {now.get(k)!r})" for k in differ[:4])
        raise ValueError(f"resume is not allowed with other settings than its checkpoint's: it was trained with "
                         f"{shown_}{f' and {len(differ) - 4} more' if len(differ) > 4 else ''}; pass the "
                         "checkpoint's values to continue its run")


def warn_budget_change(resume, steps: int, stacklevel: int = 2) -> None:
    """Warn (one line) where a resume's step budget differs from the one its checkpoint was trained with: the lr
    schedule is a function of the budget. fit calls it once the checkpoint is restored (not before a refusal)."""
    saved = resume.get("fit") if isinstance(resume, dict) else None
    budget = saved.get("steps") if isinstance(saved, dict) else None
    if isinstance(budget, int) and budget != steps:
        warnings.warn(f"steps={steps} differs from the checkpoint's budget {budget}: the lr schedule changes from "
                      f"step {int(resume['step'])} on, so this is neither run's trajectory", stacklevel=stacklevel + 1)


__all__ = ["check_data", "check_sizes", "check_inputs", "inputs_checked", "check_checkpoint_path", "checked_device",
           "check_arguments", "check_resume_settings", "warn_budget_change"]
