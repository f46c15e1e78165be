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


def in_float64(fn):
    """Decorator of the quadratures fn(model, guide, data, ...) of analysis.exact: where model and guide are both
    torch.nn.Modules computing in float32, fn runs on float64 copies of them (parameters and buffers), with the param
    store's values in float64 while it runs (Pyro's param store scope: the store is put back as it was after). The
    numbers are those of the same networks; the nodes are no longer rounded to float32 before the networks see
    them. That rounding (a relative shift of up to 6e-8 per node) is no error the refinement can see: near the steep
    decision boundary of a vae's decoder at n = 1000 (8000 steps) it moved exact()'s recon[x0] by 3.6e-7, where the
    reported error was 1.1e-7. A model or guide that is not a plain nn.Module is evaluated as it is: a function, and
    a PyroModule (Pyro's autoguides: their prototype trace and non-leaf tensors do not survive a copy), and any module
    that cannot be copied."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # fn itself reports the wrong call
            return fn(*args, **kwargs)
        model, guide = bound.arguments.get("model"), bound.arguments.get("guide")
        plain = all(isinstance(m, torch.nn.Module) and not isinstance(m, PyroModule) for m in (model, guide))
        if not plain or any(p.dtype != torch.float32 for m in (model, guide) for p in m.parameters()
                            if p.is_floating_point()):
            return fn(*args, **kwargs)
        from infer.checks import already_checked, inputs_checked

        try:
            copies = {"model": copy.deepcopy(model).double(), "guide": copy.deepcopy(guide).double()}
        except Exception:  # noqa: BLE001  a module that cannot be copied (non-leaf tensors): evaluated as it is
            return fn(*args, **kwargs)
        store = pyro.get_param_store()
        state = store.get_state()
        wide = {"params": {k: v.detach().double() if v.dtype == torch.float32 else v
                           for k, v in state["params"].items()}, "constraints": state["constraints"]}
        data = bound.arguments.get("data")
        checked = already_checked(model, guide, data)  # the copies are the same model and guide
        bound.arguments.update(copies)
        with store.scope(wide), (inputs_checked(bound.arguments["model"], bound.arguments["guide"], data) if checked
                                 else contextlib.nullcontext()):
            return fn(*bound.args, **bound.kwargs)

    return wrapped
