"""Everything fit does before its first step: the weighted model and guide, the parameters drawn afresh (or kept),
the checks of guide and objective, the params to train and their Adam, and a checkpoint's state put back."""
import warnings
import weakref

import pyro
import torch
from pyro import poutine

from guides.check import check_guide
from .checkpoint import set_rng_state
from .objectives import check_objective
from .weights import LatentScale, kl_weight, weighted


_INITIAL = weakref.WeakKeyDictionary()  # module -> {name: value at the first fit} for params nothing can re-draw


def reset_parameters(*modules) -> None:
    """Re-initialise the parameters of each nn.Module from torch's RNG, as if it were built now: every submodule's
    own reset_parameters() (nn.Linear, models.nets.LogGain, ...); a Pyro autoguide sets itself up afresh at its
    next call (its prototype trace is dropped, so its params and random buffers are drawn again); any other
    parameter (no reset_parameters() owns it) is put back to its value when fit first saw the module. Callables
    that are not modules keep their pyro.param sites, which restart from their init values when the param store
    is cleared."""
    from pyro.infer.autoguide import AutoGuide, AutoNormalizingFlow

    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        covered = set()
        for sub in module.modules():
            if isinstance(sub, AutoGuide):  # set up afresh, params and all, at its next call
                sub.prototype_trace = None
                if isinstance(sub, AutoNormalizingFlow):  # its flow is built lazily, and only once
                    sub.transform = None
                covered |= {id(p) for p in sub.parameters()}
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
                covered |= {id(p) for p in sub.parameters(recurse=False)}
        rest = {name: p for name, p in module.named_parameters() if id(p) not in covered}
        first = _INITIAL.setdefault(module, {name: p.detach().clone() for name, p in rest.items()})
        with torch.no_grad():
            for name, p in rest.items():
                if name in first and first[name].shape == p.shape:
                    p.copy_(first[name])
                else:
                    first[name] = p.detach().clone()


def adam(params, v, device):
    """(fused, optimizer): torch's Adam over params with v's lr and betas, fused where the kernel covers them."""
    from .adam import LeanAdam

    fused = all(p.is_floating_point() for p in params) and device.type in ("cpu", "cuda")
    betas = tuple(float(b) for b in v["adam_betas"])
    try:
        if fused:
            return True, LeanAdam(params, lr=v["lr"], betas=betas)
        return False, torch.optim.Adam(params, lr=v["lr"], betas=betas)
    except RuntimeError:  # a device or dtype the fused kernel does not cover
        return False, torch.optim.Adam(params, lr=v["lr"], betas=betas)


def prepare(model, guide, data, elbo, v, device, start=0):
    """Everything before the first step, in the order that decides the RNG stream: move to the device, seed, reset
    (or keep) the params, check guide and objective, collect the params to train. With v['freeze_model'] the model's
    params (model_params) are never reset, whatever v['init'] says: init='reset' draws the guide's alone. Returns a
    namespace with guide, x, needs_guide, names (the param store names), store, trained (names to train), params
    (their tensors), scale (the LatentScale), model_w and guide_w (the weighted model and guide, None without a
    guide)."""
    from types import SimpleNamespace

    needs_guide = getattr(elbo, "needs_guide", True)
    guide = guide if needs_guide else None
    for module in (model, guide):
        if isinstance(module, torch.nn.Module):
            module.to(device)
    x = data.x.to(device)
    if v["seed"] is not None:
        pyro.set_rng_seed(v["seed"])
    store = pyro.get_param_store()
    kept = ({name: store.get_param(name).unconstrained().detach().clone() for name in store.keys()}
            if v["init"] == "keep" or v["freeze_model"] else {})
    pyro.clear_param_store()
    if v["init"] == "reset":  # a frozen model keeps what it was trained to: only the guide is drawn again
        reset_parameters(*((guide,) if v["freeze_model"] else (model, guide)))
    if needs_guide:
        check_guide(model, guide, x)
    check_objective(elbo, model, guide, x)  # objective exact: the model alone
    scale = LatentScale(kl_weight(start, v["beta"], v["warmup"], v["warmup_start"]))
    if needs_guide:
        model_w, guide_w = scale(weighted(model, data, device)), scale(weighted(guide, data, device))
    with poutine.trace(param_only=True) as captured, warnings.catch_warnings():
        # check_objective ran the precise mean-field check; Pyro's order-based one only warns on valid guides
        warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        if needs_guide:
            elbo.loss(model_w, guide_w, x)
        else:  # the model's own params (an objective may hide them from outer handlers, e.g. by poutine.block)
            with torch.no_grad(), torch.random.fork_rng():
                model(x)
    names = sorted(set(captured.trace.nodes) & set(store.keys()))
    frozen = model_params(model, x) if v["freeze_model"] else set()
    keep = set(names) if v["init"] == "keep" else frozen
    if kept:  # pyro.param sites keep their values from the store; an nn.Module's params are the module's own
        own = {id(p) for m in (model, guide) if isinstance(m, torch.nn.Module) for p in m.parameters()}
        with torch.no_grad():
            for name in names:
                value = store.get_param(name).unconstrained()
                if name in keep and id(value) not in own and name in kept and kept[name].shape == value.shape:
                    value.copy_(kept[name])
    trained = [name for name in names if name not in frozen]
    if v["freeze_model"] and not trained:
        raise ValueError("freeze_model=True is not allowed here: the guide has no params of its own to train")
    params = list({id(p): p for p in (store.get_param(name).unconstrained() for name in trained)}.values())
    for p in params:
        p.requires_grad_(True)
    return SimpleNamespace(guide=guide, x=x, needs_guide=needs_guide, names=names, store=store, trained=trained,
                           params=params, scale=scale, model_w=model_w if needs_guide else None,
                           guide_w=guide_w if needs_guide else None)


def model_params(model, x) -> set:
    """The param store names the model touches alone (run once on x, its RNG forked, without gradients): what
    freeze_model=True freezes."""
    with poutine.trace(param_only=True) as alone, torch.random.fork_rng(), torch.no_grad():
        model(x)
    return set(alone.trace.nodes)


def moments_problem(optimizer) -> str:
    """Why an optimizer's loaded state does not fit its params ('' if it does): every state tensor but the step
    count has its param's shape, the step count is one number >= 0, and a second moment (..._sq) is >= 0."""
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    continue
                where = f"param {i}" + (f" of group {g}" if len(optimizer.param_groups) > 1 else "")
                if key == "step":
                    if value.numel() != 1 or not bool(value.reshape(()) >= 0):
                        return f"the step count of {where} is not one number >= 0"
                elif tuple(value.shape) != tuple(p.shape):
                    return f"{key} of {where} has shape {tuple(value.shape)} where the param has {tuple(p.shape)}"
                elif key.endswith("_sq") and bool((value < 0).any()):
                    return f"{key} of {where} holds negative values: a second moment is >= 0"
    return ""


def restore(resume, names, store, result, window, device):
    """Put a checkpoint's params (by name, shape-checked), buffers, optimiser, RNG, history and window in place.
    Raises ValueError (one line) if the checkpoint's Adam betas differ from result.recipe's adam_betas: loading its
    state would silently train on with the checkpoint's."""
    missing = sorted(set(names) - set(resume["params"]))
    if missing:
        raise ValueError(f"resume: the checkpoint has no params {', '.join(missing)}; it was written for another "
                         "model or guide")
    extra = sorted(set(resume["params"]) - set(names))
    if extra:  # a checkpoint of a larger model: resuming would drop its params silently
        raise ValueError(f"resume: the checkpoint has params this model and guide do not ({', '.join(extra[:3])}"
                         f"{', ...' if len(extra) > 3 else ''}); it was written for another model or guide")
    for name in names:
        mine, saved = store.get_param(name).unconstrained(), resume["params"][name]
        want, have = tuple(mine.shape), tuple(saved.shape)
        if want != have:
            raise ValueError(f"resume: the checkpoint's param {name} has shape {have} but this model/guide's has "
                             f"shape {want}; it was written for another model, guide or data.n")
        if saved.dtype != mine.dtype:  # copy_ would round it silently
            raise ValueError(f"resume: the checkpoint's param {name} is {str(saved.dtype).removeprefix('torch.')} but "
                             f"this model/guide's is {str(mine.dtype).removeprefix('torch.')}; it was written for a "
                             "model and guide of another dtype")
    saved = resume.get("buffers", {})
    odd = sorted(k for k, b in saved.items() if k not in result.buffers or b.shape != result.buffers[k].shape)
    if odd:
        raise ValueError(f"resume: the checkpoint's buffers {', '.join(odd)} do not match this model and guide")
    with torch.no_grad():  # by name: params is deduplicated, so it need not line up with names
        for name in names:
            store.get_param(name).unconstrained().copy_(resume["params"][name])
        for name, value in saved.items():
            result.buffers[name].copy_(value)
    wanted = tuple(float(b) for b in result.recipe["adam_betas"])
    saved_betas = {tuple(float(b) for b in g["betas"]) for g in resume["optimizer"].get("param_groups", [])
                   if isinstance(g, dict) and isinstance(g.get("betas"), (list, tuple))}
    if saved_betas and saved_betas != {wanted}:  # loading the state would put the checkpoint's betas in place
        raise ValueError(f"adam_betas={wanted} is not allowed with this resume: the checkpoint's Adam ran with betas "
                         f"{', '.join(map(str, sorted(saved_betas)))}, which loading its state would keep; resume with "
                         "those adam_betas")
    try:
        result.optimizer.load_state_dict(resume["optimizer"])
    except (ValueError, KeyError) as err:
        raise ValueError(f"resume: the checkpoint's optimizer state does not fit these params ({err})") from None
    why = moments_problem(result.optimizer)
    if why:
        raise ValueError(f"resume: the checkpoint's optimizer state does not fit these params ({why}); it was written "
                         "for another model or guide, or it is corrupt")
    set_rng_state(resume["rng"])
    result.history = list(resume.get("history", []))
    result.initial_loss = resume.get("initial_loss")
    window.load(resume.get("window"), device)


__all__ = ["reset_parameters", "adam", "prepare", "restore", "moments_problem"]
