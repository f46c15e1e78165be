"""fit(): stochastic variational inference as a plain loop over a Pyro ELBO, callable without Hydra."""
import math
import random
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from guides.check import check_guide
from .elbo import ClosedFormELBO
from .objectives import check_objective
from .weights import DataWeights, LatentScale, kl_weight

SCHEDULES = ("exponential", "cosine", "constant")


def weighted(fn, data):
    """fn with every site scaled by the data weights: the loss becomes sum_k w_k (-ELBO(x_k)). Sites outside the
    data plate (a joint guide's auxiliary site) get weight 1/N for equal weights (see DataWeights)."""
    return DataWeights(data.w)(fn)


def learning_rate(step: int, steps: int, lr: float, lr_final: float, schedule: str) -> float:
    """The learning rate at `step` of `steps`: lr decays to lr_final exponentially or by a cosine, or stays."""
    t = min(step / max(steps, 1), 1.0)
    if schedule == "exponential":
        return lr * (lr_final / lr) ** t
    if schedule == "cosine":
        return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * t))
    if schedule == "constant":
        return lr
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


@dataclass
class FitResult:
    """What training produced: the logged history and the state needed to resume."""

    history: list = field(default_factory=list)
    steps: int = 0
    wall_seconds: float = 0.0
    optimizer: object = None
    buffers: dict = field(default_factory=dict)  # non-parameter module state, e.g. an IAF's random permutation

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def module_buffers(model, guide) -> dict:
    """{'model.<name>' | 'guide.<name>': tensor}: the buffers of model and guide (those that are nn.Modules). They
    are state that is not a param, e.g. the random permutation and masks of an AutoIAFNormal, drawn when the guide
    is first run, so a resumed run must restore them."""
    return {f"{role}.{name}": buf for role, module in (("model", model), ("guide", guide))
            if isinstance(module, torch.nn.Module) for name, buf in module.named_buffers()}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _reporter(model, guide, x, log_every):
    """For ELBOs without per-term output: a closure giving the loss terms (one 64-particle closed-form estimate,
    recomputed once per logging window) to log beside Pyro's own gradient steps."""
    probe, cache = ClosedFormELBO(num_particles=64), {}

    def terms_of(step):
        window = step // log_every
        if cache.get("window") != window:
            with torch.no_grad():
                cache.update(window=window, terms=probe.particle_terms(model, guide, x))
        return cache["terms"]

    return terms_of


def fit(model, guide, data, *, elbo=None, steps: int = 10000, lr: float = 3e-3, lr_final: float = 3e-5,
        schedule: str = "exponential", adam_betas=(0.9, 0.999), beta: float = 1.0, warmup: int = 0,
        warmup_start: float = 0.0, seed=None, log_every: int = 100,
        progress: bool = False, resume: dict = None, callback=None, checkpoint_path=None,
        checkpoint_every: int = 0) -> FitResult:
    """Minimise elbo's loss of guide against model on the weighted one-bit data with Adam.

    The param store is cleared first, so params come from the model and guide as they are now.
    `elbo` defaults to ClosedFormELBO(num_particles=128). `resume` is a checkpoint dict (see checkpoint.py):
    training continues from its step with its params, optimiser and RNG states. Every `log_every` steps
    the window mean of each loss term is appended to the history, with the KL terms unweighted.
    Any Pyro ELBO works as `elbo` (see infer.objectives); the guide and the objective are checked against the
    model before training (check_guide, check_objective).
    With checkpoint_path and checkpoint_every > 0, a checkpoint is written every checkpoint_every steps.
    The KL terms are weighted by `beta` through LatentScale (poutine-style scaling of the latent sites of model
    and guide); with `warmup` > 0 the weight rises linearly from warmup_start * beta to beta over that many steps. `callback(step, row)` runs at each log.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not lr > 0 or not lr_final > 0:
        raise ValueError(f"lr and lr_final must be > 0, got {lr!r} and {lr_final!r}")
    learning_rate(0, steps, lr, lr_final, schedule)
    elbo = elbo if elbo is not None else ClosedFormELBO(num_particles=128)
    if seed is not None:
        pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    check_guide(model, guide, data.x)
    check_objective(elbo, model, guide, data.x)
    start = 0 if resume is None else int(resume["step"])
    scale = LatentScale(kl_weight(start, beta, warmup, warmup_start))
    model_w, guide_w, x = scale(weighted(model, data)), scale(weighted(guide, data)), data.x

    with poutine.trace(param_only=True) as captured, warnings.catch_warnings():
        # check_objective ran the precise mean-field check; Pyro's order-based one only warns on valid guides
        warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        elbo.loss(model_w, guide_w, x)
    store = pyro.get_param_store()
    names = sorted(set(captured.trace.nodes) & set(store.keys()))
    params = list({id(p): p for p in (store.get_param(name).unconstrained() for name in names)}.values())
    optimizer = torch.optim.Adam(params, lr=lr, betas=tuple(adam_betas))
    result = FitResult(optimizer=optimizer, buffers=module_buffers(model, guide))
    if resume is not None:
        missing = sorted(set(names) - set(resume["params"]))
        if missing:
            raise ValueError(f"checkpoint has no params {', '.join(missing)}; it was written for another model or guide")
        saved = resume.get("buffers", {})
        odd = sorted(k for k, v in saved.items() if k not in result.buffers or v.shape != result.buffers[k].shape)
        if odd:
            raise ValueError(f"checkpoint buffers {', '.join(odd)} do not match this model and guide")
        with torch.no_grad():  # by name: params is deduplicated, so it need not line up with names
            for name in names:
                store.get_param(name).unconstrained().copy_(resume["params"][name])
            for name, value in saved.items():
                result.buffers[name].copy_(value)
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])
        result.history = list(resume.get("history", []))

    terms_of = None if isinstance(elbo, ClosedFormELBO) else _reporter(model_w, guide_w, x, log_every)
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), disable=not progress, desc="fit", dynamic_ncols=True, mininterval=0.5)
    window = {}
    with pyro.validation_enabled(False):  # the fit check ran with validation; the hot loop skips arg checks
        for step in bar:
            rate = learning_rate(step, steps, lr, lr_final, schedule)
            scale.beta = kl_weight(step, beta, warmup, warmup_start)
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad(set_to_none=True)
            if terms_of is None:  # a ClosedFormELBO: one pass gives the loss and its terms
                terms = elbo.particle_terms(model_w, guide_w, x)
                loss = elbo.objective(terms)
                loss.backward()
            else:  # any other Pyro ELBO (Trace_ELBO, TraceMeanField_ELBO, RenyiELBO, ...) trains as Pyro defines it
                loss = torch.as_tensor(elbo.loss_and_grads(model_w, guide_w, x))
                terms = terms_of(step)
            optimizer.step()
            for k, v in terms.items():  # report KL terms unweighted
                weight = scale.beta if k.startswith("kl_") and scale.beta > 0 else 1.0
                window[k] = window.get(k, 0.0) + float(v.detach().mean()) / weight
            window["objective"] = window.get("objective", 0.0) + float(loss.detach())
            window["beta"] = window.get("beta", 0.0) + scale.beta
            if (step + 1) % log_every == 0 or step + 1 == steps:
                count = (step + 1) - (result.history[-1]["step"] if result.history else start)
                row = {"step": step + 1, "lr": rate, **{k: v / count for k, v in window.items()}}
                row["loss"] = row["recon"] + sum(v for k, v in row.items() if k.startswith("kl_"))
                result.history.append(row)
                window = {}
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                if callback is not None:
                    callback(step + 1, row)
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"loss became {row['loss']} at step {step + 1}; lower optim.lr")
            if checkpoint_path and checkpoint_every and (step + 1) % checkpoint_every == 0:
                result.steps = step + 1
                save_checkpoint(checkpoint_path, result)
    result.steps, result.wall_seconds = steps, time.perf_counter() - t0
    return result


from .checkpoint import save_checkpoint  # noqa: E402  (checkpoint imports rng_state from this module)
