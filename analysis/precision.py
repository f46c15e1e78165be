"""The dtype the quadratures of analysis.exact compute in: torch's default dtype follows the model's parameters while
they run (on_parameter_dtype), and float32 networks are evaluated as float64 copies (in_float64), so that no
quadrature node is rounded to float32 before a network sees it."""
import contextlib
import copy
import functools
import inspect

import pyro
import torch
from pyro.nn import PyroModule


def on_parameter_dtype(fn):
    """Decorator of the public functions fn(model, guide, data, ...) of analysis.exact: while fn runs, torch's default
    dtype is that of the model's (else the guide's) parameters, and it is restored afterwards, so that code the model
    and guide call which creates tensors in the default dtype follows them (Pyro's AffineAutoregressive inverse, in
    AutoIAFNormal's density, starts from torch.zeros). Nothing changes where the default is that dtype already (a
    float32 model under torch's default), where neither has a floating-point parameter, or for dtypes other than
    float32 and float64."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError:  # fn itself reports the wrong call
            return fn(*args, **kwargs)
        dtype = None
        for role in ("model", "guide"):
            value = bound.get(role)
            if dtype is None and isinstance(value, torch.nn.Module):
                dtype = next((p.dtype for p in value.parameters() if p.is_floating_point()), None)
        saved = torch.get_default_dtype()
        if dtype not in (torch.float32, torch.float64) or dtype == saved:
            return fn(*args, **kwargs)
        torch.set_default_dtype(dtype)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_default_dtype(saved)

    return wrapped


def _copied(module):
    """A float64 copy of a plain float32 torch.nn.Module; None for anything else (a function, a PyroModule, such
    as Pyro's autoguides, whose prototype trace and non-leaf tensors do not survive a copy, a float64 module, or a
    module that cannot be copied)."""
    if not isinstance(module, torch.nn.Module) or isinstance(module, PyroModule):
        return None
    if not _float32(module):
        return None
    try:
        return copy.deepcopy(module).double()
    except Exception:  # noqa: BLE001  non-leaf tensors and the like: evaluated as it is
        return None


def _set_up(module) -> bool:
    """False for an autoguide never run: it sets itself up from its model (the float32 one) at its first call."""
    return getattr(module, "prototype_trace", True) is not None


def _float32(module) -> bool:
    return any(p.dtype == torch.float32 for p in module.parameters() if p.is_floating_point())


def _runs_wide(guide, wide, data) -> bool:
    """Whether a guide that is not copied (a PyroModule) draws every latent in float64 from the float64 store (Pyro's
    AutoNormal does; AutoMultivariateNormal mixes in float32 tensors of its own and fails). Its draw is made on a
    forked RNG, so that nothing after it changes."""
    x = getattr(data, "x", None)
    if not torch.is_tensor(x):
        return False
    store = pyro.get_param_store()
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as on_parameter_dtype sets it for a float64 model
    try:
        with store.scope(wide), torch.random.fork_rng(devices=[]):
            trace = pyro.poutine.trace(guide).get_trace(x.double())
    except Exception:  # noqa: BLE001  float32 tensors of its own: it runs as it is
        return False
    finally:
        torch.set_default_dtype(saved)
    return all(site["value"].dtype == torch.float64 for site in trace.nodes.values()
               if site["type"] == "sample" and not site["is_observed"] and site["value"].is_floating_point())


def _restore(own: dict) -> None:
    """Put back the PyroModules' own parameter tensors (the store's), as they were before a float64 scope."""
    for m, params in own.items():
        m._parameters.clear()
        m._parameters.update(params)


def in_float64(fn):
    """Decorator of the quadratures fn(model, guide, data, ...) of analysis.exact: a model or guide that is a plain
    torch.nn.Module computing in float32 runs as a float64 copy (parameters and buffers), and the param store's
    values are float64 while fn runs (Pyro's param store scope: the store is put back as it was after), so that a
    PyroModule guide whose parameters live in the store (Pyro's AutoNormal) computes in float64 as it is. The numbers
    are those of the same networks; the nodes are no longer rounded to float32 before the networks see them. That
    rounding (a relative shift of up to 6e-8 per node) is no error the refinement can see: near the steep decision
    boundary of a vae's decoder at n = 1000 (8000 steps) it moved exact()'s recon[x0] by 3.6e-7, where the reported
    error was 1.1e-7. What cannot be copied (an autoguide's own nn submodules, as AutoIAFNormal's) is evaluated as it
    is, in its own dtype: the densities feed each part its dtype (analysis.densities). Where the model or the guide
    is a function, both are evaluated as they are (a function's pyro.params keep their dtype)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # fn itself reports the wrong call
            return fn(*args, **kwargs)
        model, guide = bound.arguments.get("model"), bound.arguments.get("guide")
        if not all(isinstance(m, torch.nn.Module) for m in (model, guide)):  # a function's params: its own dtype
            return fn(*args, **kwargs)
        own = {m: dict(m._parameters) for part in (model, guide) if isinstance(part, PyroModule)
               for m in part.modules()}  # a PyroModule points its attributes at a scope's float64 params
        copies = {role: c for role, c in (("model", _copied(model)), ("guide", _copied(guide))) if c is not None}
        store = pyro.get_param_store()
        state = store.get_state()
        if not copies and not any(v.dtype == torch.float32 for v in state["params"].values()):
            return fn(*args, **kwargs)
        from infer.checks import already_checked, inputs_checked

        wide = {"params": {k: v.detach().double() if v.dtype == torch.float32 else v
                           for k, v in state["params"].items()}, "constraints": state["constraints"]}
        data = bound.arguments.get("data")
        wide_ok = all(role in copies or (_set_up(m) and (not _float32(m) or role == "guide"
                                                           and _runs_wide(m, wide, data)))
                      for role, m in (("model", model), ("guide", guide)))
        _restore(own)  # the probe's scope too
        if not wide_ok:
            return fn(*args, **kwargs)  # one part keeps float32 tensors of its own: both as they are, one dtype
        checked = already_checked(model, guide, data)  # the copies are the same model and guide
        bound.arguments.update(copies)
        try:
            with store.scope(wide), (inputs_checked(bound.arguments["model"], bound.arguments["guide"], data)
                                     if checked else contextlib.nullcontext()):
                return fn(*bound.args, **bound.kwargs)
        finally:
            _restore(own)

    return wrapped
