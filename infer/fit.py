"""fit(): stochastic variational inference as a plain loop over a Pyro ELBO, callable without Hydra.

One recipe per model (recipe()) gives fit's defaults and the command line's (conf/model/*.yaml, conf/optim/adam.yaml
must agree with it; tests/test_fit.py checks that).
"""
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from guides.check import check_guide
from .average import ParameterAverage, average_start
from .checkpoint import module_buffers, resume_state, rng_state, save_checkpoint, set_rng_state
from .checks import (_check_arguments, _device, check_checkpoint_path, check_data, check_inputs, check_sizes,
                     inputs_checked)
from .elbo import ClosedFormELBO
from .objectives import check_objective
from .runtime import flush_denormals, training_settings  # noqa: F401  (re-exported: infer.fit.flush_denormals)
from .validate import SCHEDULES
from .weights import DataWeights, LatentScale, kl_weight


class DivergenceError(ValueError):
    """Training produced a non-finite loss or gradient. `step` is the first bad step (1-based), `cause` the likely
    cause in words; `result` is the FitResult up to the last good log (its params were never checkpointed)."""

    def __init__(self, message, step=None, cause=None, result=None):
        super().__init__(message)
        self.step, self.cause, self.result = step, cause, result


@dataclass(frozen=True)
class Recipe:
    """A model's training recipe: the settings fit uses for every argument left unspecified, and the command
    line's defaults for the model (conf/model/<model>.yaml, conf/optim/adam.yaml)."""

    steps: int
    num_particles: int
    noise: str
    lr: float
    lr_final: float
    schedule: str
    betas: tuple
    average: float = 0.0  # the final parameters are the mean of the iterates over this last fraction of the steps


# 1-layer VAE: many cheap steps with few lattice particles (lattice noise: a randomised quadrature rule over the
# first Gaussian coordinate, which sees the costly tails every step)
VAE_RECIPE = Recipe(steps=8000, num_particles=32, noise="lattice", lr=3e-3, lr_final=3e-5, schedule="exponential",
                    betas=(0.9, 0.99))
# DLGM: more particles and more steps, a low final rate, Adam's long second-moment memory, and the mean of the last
# 10% of the iterates (infer.average); with its 3-layer prior net (models.DLGM) and infer.runtime's settings, 14000
# steps at n = 1000 took 55.8-59.9 s in this 2-core machine's fastest spell and up to 108 s in its slow ones
# (README, "The DLGM at n = 1000")
DLGM_RECIPE = Recipe(steps=14000, num_particles=128, noise="lattice", lr=3e-3, lr_final=3e-5,
                     schedule="exponential", betas=(0.9, 0.999), average=0.1)
# any other model
DEFAULT_RECIPE = Recipe(steps=10000, num_particles=128, noise="lattice", lr=3e-3, lr_final=3e-5,
                        schedule="exponential", betas=(0.9, 0.99))


def recipe(model) -> Recipe:
    """The training recipe of a model (an instance or a class): VAE_RECIPE, DLGM_RECIPE, else DEFAULT_RECIPE."""
    from models import DLGM, VAE

    cls = model if isinstance(model, type) else type(model)
    if issubclass(cls, DLGM):
        return DLGM_RECIPE
    if issubclass(cls, VAE):
        return VAE_RECIPE
    return DEFAULT_RECIPE


def weighted(fn, data, device=None):
    """fn with every site scaled by the data weights: the loss becomes sum_k w_k (-ELBO(x_k)). Sites outside the
    data plate (a joint guide's auxiliary site) get weight 1/N for equal weights (see DataWeights)."""
    w = data.w if device is None else data.w.to(device)
    return DataWeights(w)(fn)


def learning_rate(step: int, steps: int, lr: float, lr_final: float, schedule: str) -> float:
    """The learning rate at `step` of `steps`: lr decays to lr_final exponentially or by a cosine, or stays."""
    t = min(step / max(steps, 1), 1.0)
    if schedule == "exponential":
        return lr * (lr_final / lr) ** t
    if schedule == "cosine":
        return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * t))
    if schedule == "constant":
        return lr
    raise ValueError(f"schedule={schedule!r} is not allowed: schedule must be one of {', '.join(SCHEDULES)}")


@dataclass
class FitResult:
    """What training produced: the logged history and the state needed to resume.

    initial_loss: the objective at the first step of a fresh run (before any update): a run that ends above it
    got worse. window: the partial logging window at `steps` (a checkpoint carries it, so a resumed history is the
    same as an uninterrupted one)."""

    history: list = field(default_factory=list)
    steps: int = 0
    wall_seconds: float = 0.0  # the training loop and its setup (choosing and tracing the engine)
    setup_seconds: float = 0.0  # of which the setup
    optimizer: object = None
    buffers: dict = field(default_factory=dict)  # non-parameter module state, e.g. an IAF's random permutation
    initial_loss: float = None
    window: dict = None
    engine: str = None  # the path that trained: graph (traced plan), fast (eager fast path) or general
    recipe: dict = None  # the settings this run used (fit's arguments after the recipe filled them in)

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


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


GRAPH_MIN_STEPS = 200  # the traced plan costs a second or two to trace: worth it from this many steps on


def _engine(elbo, model, guide, model_w, guide_w, x, weights, beta, params, steps_left):
    """('graph', plan) | ('fast', None) | ('general', None): the fastest path that gives the general path's
    numbers here. The eager fast path (ClosedFormELBO.fast_terms) is checked against particle_terms once; for runs
    of GRAPH_MIN_STEPS steps or more, the traced plan (ClosedFormELBO.traced_step) is checked against the eager fast
    path, loss and gradients, on the same noise. Every check runs on a forked RNG: the caller's is untouched."""
    if not _fast_path_applies(elbo, model, guide, model_w, guide_w, x, weights, beta):
        return "general", None
    if steps_left < GRAPH_MIN_STEPS:
        return "fast", None
    reason = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = elbo.traced_step(model, guide, x, weights)
            with torch.random.fork_rng():
                beta_t = torch.as_tensor(beta, dtype=torch.float32, device=x.device)
                args = plan.inputs(beta_t)
                state = torch.get_rng_state()
                want = plan.forward(*args)
                torch.set_rng_state(state)
                got = plan.graph(*args)
            grads = [torch.autograd.grad(out[1], params, allow_unused=True) for out in (want, got)]
    except Exception as err:  # noqa: BLE001  any failure keeps the eager fast path
        reason = f"tracing failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
    else:
        if not torch.allclose(want[0], got[0], rtol=1e-5, atol=1e-6):
            reason = "the traced loss terms differ from the eager ones"
        for a, b in zip(*grads):
            if (a is None) != (b is None) or a is not None and not torch.allclose(
                    a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(a.abs().max()))):
                reason = "the traced gradients differ from the eager ones (e.g. torch.no_grad or a custom autograd " \
                         "function in the model or guide)"
                break
    if reason is not None:
        warnings.warn(f"fit: the traced plan does not apply to this model and guide ({reason}); training on the "
                      "eager fast path", stacklevel=4)
        return "fast", None
    return "graph", plan


def _check_plan(plan, step):
    """Re-run the traced plan's last step eagerly (same noise, same RNG state, no gradients) and raise
    RuntimeError if its loss terms differ: value-dependent Python control flow left the traced branch."""
    with torch.random.fork_rng(), torch.no_grad():
        if plan.last_rng is not None:
            torch.set_rng_state(plan.last_rng)
        eager = plan.forward(*plan.last_args)[0]
    if not torch.allclose(eager, plan.last_means.detach(), rtol=1e-5, atol=1e-6, equal_nan=True):
        raise RuntimeError(f"the traced plan's loss terms differ from the eager ones at step {step} (a model or "
                           "guide whose Python control flow depends on values); rerun fit with engine='general'")


def _fast_path_applies(elbo, model, guide, model_w, guide_w, x, weights, beta) -> bool:
    """Whether ClosedFormELBO.fast_terms gives particle_terms' values here: both are run once on the same RNG state
    (forked: the caller's is untouched) and compared. Where not, fit trains on the general path and says so once."""
    reason = None
    if not (elbo.vectorize_particles and elbo.num_particles > 1):
        reason = "it needs vectorised particles with num_particles > 1"
    else:
        with torch.random.fork_rng(), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
            state = torch.get_rng_state()
            general = elbo.particle_terms(model_w, guide_w, x)
            torch.set_rng_state(state)
            try:
                fast = elbo.fast_terms(model, guide, x, weights, beta)
            except Exception as err:  # noqa: BLE001  any failure sends training down the general path
                reason = f"it failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
            else:
                if list(fast) != list(general) or not all(
                        torch.allclose(fast[k], general[k], rtol=1e-6, atol=1e-6, equal_nan=True) for k in general):
                    reason = "its loss terms differ from the general path's"
    if reason is not None:
        warnings.warn(f"fit: the fast path does not apply to this model and guide ({reason}); training on the "
                      "general path (Pyro's trace and replay)", stacklevel=4)
    return reason is None


def _final_check(compute, start, steps):
    """One more evaluation of the objective at the final parameters (no gradients, the RNG untouched): an update
    that made the parameters produce a non-finite loss is caught here, not in evaluation."""
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        try:
            loss, vec = compute(steps - 1 if steps > start else start)
        except (ValueError, RuntimeError):  # a model or guide that refuses non-finite inputs itself
            return False
    return bool(torch.isfinite(vec).all()) and bool(torch.isfinite(loss).all())


def fit(model, guide, data, *, elbo=None, steps: int = None, lr: float = None, lr_final: float = None,
        schedule: str = None, adam_betas=None, beta: float = 1.0, warmup: int = 0, warmup_start: float = 0.0,
        seed=None, log_every: int = 100, progress: bool = False, resume: dict = None, callback=None,
        checkpoint_path=None, checkpoint_every: int = 0, checkpoint_extra: dict = None, threads=1,
        init: str = "reset", freeze_model: bool = False, device="cpu", engine: str = "auto",
        average: float = None) -> FitResult:
    """Minimise elbo's loss of guide against model on the weighted one-bit data with Adam (fused).

    Defaults: every argument left None comes from the model's recipe (recipe(model)): steps, lr, lr_final,
    schedule, adam_betas, and elbo = ClosedFormELBO(num_particles, noise) of the recipe. These are the command
    line's defaults too. Any Pyro ELBO works as `elbo` (see infer.objectives); the guide and the objective are
    checked against the model before training (check_guide, check_objective). Every argument is checked first
    (infer.validate): a bad one raises ValueError in one line before any work.

    Reproducibility: with `seed` (an integer in [0, 2**32 - 1]: numpy's range), torch's, numpy's and Python's RNGs
    are seeded, and with init="reset" (default)
    the parameters of model and guide are drawn again from that seed (reset_parameters), so a script gives the same
    numbers although its networks were built before fit seeded; calling fit twice starts afresh both times.
    init="keep" warm-starts from the current values (nn.Module params and pyro.param values alike).
    threads: torch's thread count during fit (restored afterwards); None leaves it. It changes no number: MKL's
    matmuls stay on the calling thread (infer.runtime.serial_blas), so 2 threads train bit for bit as 1. 1 is fastest
    for small n (2 measured 3-6% slower at n <= 100); at n = 1000, on an otherwise idle machine, 2 are faster (the
    large elementwise ops split); where another process holds the second core they wait on it at every op (two such
    runs on 2 cores measured 7x slower: infer.runtime.oversubscription).
    device: model and guide (nn.Modules) are moved there, and the data; pyro.param sites a user's function creates
    must be created on it by the user.

    engine: "auto" trains a ClosedFormELBO through its fast path (ClosedFormELBO.fast_terms: one light handler per
    run instead of Pyro's trace and replay), after checking once that it gives the general path's terms; where it
    does not apply, a warning says so and the general path runs. "general" always runs Pyro's trace and replay.

    freeze_model=True trains only the guide's params (those not touched by the model alone), the model is frozen.
    An objective with `needs_guide = False` (e.g. infer.marginal.MarginalLikelihood) trains the model alone by
    `elbo.marginal_terms(model, data)['nll']`; guide may then be None, and rows hold step, lr, nll, loss (= nll)
    and objective (= nll).

    Divergence: every step's loss, loss terms and gradients are checked for finiteness on the device (no host
    sync); a non-finite step is skipped by the optimizer, and the next log (or checkpoint) raises DivergenceError
    (one line: the first bad step and the likely cause). The final parameters are checked by one more evaluation.
    A checkpoint is written only of parameters whose loss and gradients were finite, so the last good one survives.

    `resume` is a checkpoint dict (infer.checkpoint.load_checkpoint(path)) or its path: training continues from
    its step with its params (checked by name and shape), optimiser, RNG states, history and partial logging
    window, and gives the same history as an uninterrupted run. Every `log_every` steps the window mean of each
    loss term is appended to the history, with the KL terms unweighted. With checkpoint_path (a file in a folder
    that exists), a checkpoint (with the dict checkpoint_extra's entries) is written at the end and, with
    checkpoint_every > 0, every checkpoint_every steps: checkpoint_every=0 means "only at the end", as the command
    line's train.checkpoint_every=0. The KL terms are weighted by `beta` through LatentScale (poutine-style scaling
    of the latent sites of model and guide); with `warmup` > 0 the weight rises linearly from warmup_start * beta
    to beta over that many steps. `callback(step, row)` runs at each log.

    average: the parameters fit ends with are the mean of the iterates over the last ceil(average * steps) steps
    (Polyak-Ruppert averaging, infer.average; 0: the last iterate). The history logs the iterates' losses; the
    final check and the final checkpoint hold the averaged parameters, and every checkpoint inside the averaging
    window carries the running mean, so a resumed run averages as an uninterrupted one.
    """
    plan = recipe(model)
    steps = plan.steps if steps is None else steps
    lr = plan.lr if lr is None else lr
    lr_final = plan.lr_final if lr_final is None else lr_final
    schedule = plan.schedule if schedule is None else schedule
    adam_betas = plan.betas if adam_betas is None else adam_betas
    average = plan.average if average is None else average
    values = dict(steps=steps, lr=lr, lr_final=lr_final, schedule=schedule, adam_betas=adam_betas, beta=beta,
                  warmup=warmup, warmup_start=warmup_start, seed=seed, log_every=log_every,
                  checkpoint_every=checkpoint_every, threads=threads, init=init, progress=progress,
                  freeze_model=freeze_model, engine=engine, average=average)
    if elbo is None:
        elbo = ClosedFormELBO(num_particles=plan.num_particles, noise=plan.noise)
    check_data(data)
    resume = resume_state(resume)
    _check_arguments(model, guide, data, elbo, steps, resume, values, callback, checkpoint_path, checkpoint_extra)
    device = _device(device)
    with training_settings(threads):
        return _fit(model, guide, data, elbo, values, resume, callback, checkpoint_path, checkpoint_extra, device)


def _fit(model, guide, data, elbo, v, resume, callback, checkpoint_path, checkpoint_extra, device):
    s = _prepare(model, guide, data, elbo, v, device, start=0 if resume is None else int(resume["step"]))
    guide, x, needs_guide, names, store, trained, params, scale = (
        s.guide, s.x, s.needs_guide, s.names, s.store, s.trained, s.params, s.scale)
    fused, optimizer = _adam(params, v, device)
    # a frozen model's params keep requires_grad (pyro.module would drop them from the param store otherwise):
    # they are left out of the optimizer, and their gradients are dropped every step
    frozen = [p for p in (store.get_param(name).unconstrained() for name in names if name not in trained)
              if all(p is not q for q in params)]
    try:
        return _train(model, guide, data, elbo, v, resume, callback, checkpoint_path, checkpoint_extra, device,
                      names, store, params, fused, optimizer, x, needs_guide, scale, s.model_w, s.guide_w, frozen)
    finally:
        for p in frozen:
            p.grad = None


def _adam(params, v, device):
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


def _prepare(model, guide, data, elbo, v, device, start=0):
    """Everything before the first step, in the order that decides the RNG stream: move to the device, seed, reset
    (or keep) the params, check guide and objective, collect the params to train. Returns a namespace with guide, x,
    needs_guide, names (the param store names), store, trained (names to train), params (their tensors), scale
    (the LatentScale), model_w and guide_w (the weighted model and guide, None without a guide)."""
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
            if v["init"] == "keep" else {})
    pyro.clear_param_store()
    if v["init"] == "reset":
        reset_parameters(model, guide)
    if needs_guide:
        check_guide(model, guide, x)
        check_objective(elbo, model, guide, x)
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
    if kept:  # pyro.param sites keep their values from the store; an nn.Module's params are the module's own
        own = {id(p) for m in (model, guide) if isinstance(m, torch.nn.Module) for p in m.parameters()}
        with torch.no_grad():
            for name in names:
                value = store.get_param(name).unconstrained()
                if id(value) not in own and name in kept and kept[name].shape == value.shape:
                    value.copy_(kept[name])
    trained = names
    if v["freeze_model"]:
        with poutine.trace(param_only=True) as alone, torch.random.fork_rng(), torch.no_grad():
            model(x)
        trained = [name for name in names if name not in alone.trace.nodes]
        if not trained:
            raise ValueError("freeze_model=True is not allowed here: the guide has no params of its own to train")
    params = list({id(p): p for p in (store.get_param(name).unconstrained() for name in trained)}.values())
    for p in params:
        p.requires_grad_(True)
    return SimpleNamespace(guide=guide, x=x, needs_guide=needs_guide, names=names, store=store, trained=trained,
                           params=params, scale=scale, model_w=model_w if needs_guide else None,
                           guide_w=guide_w if needs_guide else None)


def _train(model, guide, data, elbo, v, resume, callback, checkpoint_path, checkpoint_extra, device, names, store,
           params, fused, optimizer, x, needs_guide, scale, model_w, guide_w, frozen):
    steps, log_every, checkpoint_every = v["steps"], v["log_every"], v["checkpoint_every"]
    start = 0 if resume is None else int(resume["step"])
    result = FitResult(optimizer=optimizer, buffers=module_buffers(model, guide),
                       recipe={**{k: v[k] for k in ("steps", "lr", "lr_final", "schedule", "beta", "warmup",
                                                    "warmup_start", "seed", "average")},
                               "adam_betas": tuple(v["adam_betas"]),
                               "num_particles": getattr(elbo, "num_particles", None),
                               "noise": getattr(elbo, "noise", None), "objective": type(elbo).__name__})
    window = _Window()
    averaged = ParameterAverage(params, average_start(steps, v["average"]))
    if resume is not None:
        _restore(resume, names, store, result, window, device)
        averaged.load(resume.get("average"), device, int(resume["step"]))
        for group in optimizer.param_groups:  # a checkpoint of another Adam variant: same state, our kernel
            group["fused"] = fused or None

    setup = time.perf_counter()
    plan, result.engine = None, "general"
    if not needs_guide:
        def compute(step):
            terms = elbo.marginal_terms(model, data)
            loss = terms["nll"].mean()
            return loss, torch.stack([loss, loss]).detach()
        term_names = ["nll"]
    elif isinstance(elbo, ClosedFormELBO):  # one pass gives the loss and its terms
        term_names = []
        level, plan = "general", None
        if v["engine"] == "auto":
            level, plan = _engine(elbo, model, guide, model_w, guide_w, x, data.w.to(device), scale.beta, params,
                                  steps - start)
        result.engine = level

        def compute(step):
            if plan is not None:
                keys, means, loss = plan(scale.beta)
            else:
                if level == "fast":
                    terms = elbo.fast_terms(model, guide, x, weights, scale.beta)
                else:
                    terms = elbo.particle_terms(model_w, guide_w, x)
                keys = list(terms)
                means = torch.stack([t.mean() for t in terms.values()])
                loss = elbo.objective_of_means(keys, means)
            if not term_names:
                term_names.extend(keys)
            elif keys != term_names:
                raise RuntimeError(f"the loss terms changed from {term_names} to {keys} during training")
            return loss, torch.cat([means, loss.reshape(1)]).detach()
    else:  # any other Pyro ELBO (Trace_ELBO, TraceMeanField_ELBO, RenyiELBO, ...) trains as Pyro defines it
        terms_of = _reporter(model_w, guide_w, x, log_every)
        term_names = []

        def compute(step):
            if torch.is_grad_enabled():
                loss = torch.as_tensor(elbo.loss_and_grads(model_w, guide_w, x), device=x.device)
            else:
                loss = torch.as_tensor(elbo.loss(model_w, guide_w, x), device=x.device)
            terms = terms_of(step)
            if not term_names:
                term_names.extend(terms)
            means = torch.stack([t.mean() for t in terms.values()])
            return loss, torch.cat([means, loss.reshape(1).to(means)]).detach()
        compute.backward_done = True

    weights = data.w.to(device)
    backward_done = getattr(compute, "backward_done", False)
    found_inf = torch.zeros((), device=device)  # sticky: 1 from the first non-finite step on
    bad = torch.zeros((), device=device)  # how many steps since (and with) the first non-finite one
    one = torch.ones((), device=device)

    def first_bad(done):  # done: steps completed; the first bad step, 1-based, or None
        count = int(bad.item())
        return None if count == 0 else done - count + 1

    def diverged(step, at_start):
        return _divergence(step, at_start, start, v, result, needs_guide)

    def write_checkpoint(at, rng, window_state, average_state):
        result.steps = at
        if torch.is_tensor(result.initial_loss):
            result.initial_loss = float(result.initial_loss)
        save_checkpoint(checkpoint_path, result, extra=checkpoint_extra, rng=rng, window=window_state,
                        average=average_state)

    t0 = time.perf_counter()
    result.setup_seconds = t0 - setup
    bar = tqdm(range(start, steps), disable=not v["progress"], desc="fit", dynamic_ncols=True, mininterval=0.5)
    optimizer_step = optimizer.update if fused else optimizer.step  # LeanAdam's step without torch's per-call wrapper
    with pyro.validation_enabled(False), warnings.catch_warnings():  # the fit check ran with validation
        # check_objective ran the precise mean-field check; Pyro's order-based one only warns on valid guides
        warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        for step in bar:
            pending = None
            if checkpoint_path and checkpoint_every and step % checkpoint_every == 0 and step > start:
                pending = (rng_state(), window.state(), averaged.state())  # the state at `step`, written once
                # its loss is finite
            rate = learning_rate(step, steps, v["lr"], v["lr_final"], v["schedule"])
            scale.beta = kl_weight(step, v["beta"], v["warmup"], v["warmup_start"])
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad(set_to_none=True)
            for p in frozen:
                p.grad = None
            try:
                loss, vec = compute(step)
                if not backward_done:
                    loss.backward()
            except (ValueError, RuntimeError) as err:
                if all(bool(torch.isfinite(p).all()) for p in params):
                    raise
                raise diverged(first_bad(step) or step + 1, False) from err  # a NaN in the params broke the code
            grads = [p.grad for p in params if p.grad is not None]
            # vec is a fresh detached tensor that autograd does not hold: unscaling it in place by 1 changes nothing
            torch._amp_foreach_non_finite_check_and_unscale_(grads + [vec], found_inf, one)
            bad.add_(found_inf)
            if step == 0:
                result.initial_loss = vec[-1]
            if pending is not None:
                if first_bad(step + 1) is not None:
                    raise diverged(first_bad(step + 1), first_bad(step + 1) == start + 1)
                write_checkpoint(step, *pending)
            if plan is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
                _check_plan(plan, step + 1)  # before the update: the same params as the traced call
            if fused:  # the fused kernel skips the update (and its step count) when found_inf is set
                optimizer.found_inf, optimizer.grad_scale = found_inf, None
            optimizer_step()
            averaged.update(step + 1)
            window.add(vec, scale.beta)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                if first_bad(step + 1) is not None:
                    raise diverged(first_bad(step + 1), first_bad(step + 1) == start + 1)
                row = window.row(step + 1, rate, term_names, needs_guide)
                result.history.append(row)
                if torch.is_tensor(result.initial_loss):
                    result.initial_loss = float(result.initial_loss)
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                if callback is not None:
                    callback(step + 1, row)
    averaged.apply()
    if start < steps and not _final_check(compute, start, steps):
        raise _last_update(steps, v, result)
    result.steps, result.wall_seconds = steps, time.perf_counter() - setup
    result.window = window.state()
    if torch.is_tensor(result.initial_loss):
        result.initial_loss = float(result.initial_loss)
    if checkpoint_path and start < steps:  # also with checkpoint_every=0: "only at the end", as on the command line
        write_checkpoint(steps, rng_state(), result.window, None)  # its params are the average
    return result


def _last_update(steps, v, result):
    return DivergenceError(f"training diverged at step {steps}: the last update made the loss non-finite (nan or "
                           f"inf); the learning rate is the likely cause: lower lr (optim.lr={v['lr']:g})",
                           step=steps, cause="lr", result=result)


def _divergence(step, at_start, start, v, result, needs_guide):
    """The DivergenceError for a first non-finite step `step` (1-based); at_start: before any update of this run."""
    if at_start and start == 0:
        cause = "init"
        what = ("the loss or its gradients were non-finite at the initial parameters, before any update, so not "
                "the learning rate: check " + ("beta (train.beta), the data weights, the model and the guide"
                                               if needs_guide else "the model and the objective"))
    elif needs_guide and v["beta"] > 1e3:
        cause = "beta"
        what = (f"the loss or its gradients became non-finite (nan or inf); beta={v['beta']:g} weights the KL "
                "terms so much that they overflow: lower beta (train.beta)")
    else:
        cause = "lr"
        what = ("the loss or its gradients became non-finite (nan or inf); the learning rate is the likely cause: "
                f"lower lr (optim.lr={v['lr']:g})")
    return DivergenceError(f"training diverged at step {step}: {what}", step=step, cause=cause, result=result)


def _restore(resume, names, store, result, window, device):
    """Put a checkpoint's params (by name, shape-checked), buffers, optimiser, RNG, history and window in place."""
    missing = sorted(set(names) - set(resume["params"]))
    if missing:
        raise ValueError(f"resume: the checkpoint has no params {', '.join(missing)}; it was written for another "
                         "model or guide")
    for name in names:
        want, have = tuple(store.get_param(name).unconstrained().shape), tuple(resume["params"][name].shape)
        if want != have:
            raise ValueError(f"resume: the checkpoint's param {name} has shape {have} but this model/guide's has "
                             f"shape {want}; it was written for another model, guide or data.n")
    saved = resume.get("buffers", {})
    odd = sorted(k for k, b in saved.items() if k not in result.buffers or b.shape != result.buffers[k].shape)
    if odd:
        raise ValueError(f"resume: the checkpoint's buffers {', '.join(odd)} do not match this model and guide")
    with torch.no_grad():  # by name: params is deduplicated, so it need not line up with names
        for name in names:
            store.get_param(name).unconstrained().copy_(resume["params"][name])
        for name, value in saved.items():
            result.buffers[name].copy_(value)
    try:
        result.optimizer.load_state_dict(resume["optimizer"])
    except (ValueError, KeyError) as err:
        raise ValueError(f"resume: the checkpoint's optimizer state does not fit these params ({err})") from None
    set_rng_state(resume["rng"])
    result.history = list(resume.get("history", []))
    result.initial_loss = resume.get("initial_loss")
    window.load(resume.get("window"), device)


class _Window:
    """The per-step loss terms since the last log, kept on the device until the log step (no sync per step)."""

    def __init__(self):
        self.values, self.betas = [], []

    def add(self, vec, beta):
        self.values.append(vec)
        self.betas.append(beta)

    def state(self):
        """A checkpointable copy: {'values': (k, T) tensor on the CPU, 'betas': [k floats]} (None when empty)."""
        if not self.values:
            return None
        return {"values": torch.stack(self.values).cpu(), "betas": list(self.betas)}

    def load(self, state, device):
        self.values, self.betas = [], []
        if state:
            self.values = list(state["values"].to(device).unbind(0))
            self.betas = list(state["betas"])

    def row(self, step, rate, names, needs_guide) -> dict:
        """The window means: each term (KL terms unweighted: divided by each step's beta), the objective, beta."""
        values = torch.stack(self.values).double()  # (k, T+1): the terms, then the objective
        betas = torch.tensor(self.betas, dtype=torch.float64, device=values.device)
        if needs_guide:
            kl = torch.tensor([k.startswith("kl_") for k in names] + [False], device=values.device)
            divisor = torch.where(kl & (betas > 0).unsqueeze(1), betas.unsqueeze(1), torch.ones_like(values))
            means = (values / divisor).mean(0).tolist()
            terms = dict(zip(names, means[:-1]))
            row = {"step": step, "lr": rate, "recon": terms.pop("recon")}
            # the loss terms of the latent sites, E_q[log q(s|.) - log p(s|parents)]: only their sum, the rate, is a
            # KL (the DLGM's z1 term is often negative), so they are named rate_<site>, not KL
            # (a joint autoguide's auxiliary site, Pyro's '_Auto..._latent', is its log q: named rate_joint)
            row.update({f"rate_{'joint' if k[3:].startswith('_') else k[3:]}": val for k, val in terms.items()})
            row["rate"] = sum(val for k, val in row.items() if k.startswith("rate_"))
            row.update(objective=means[-1], beta=float(sum(self.betas) / len(self.betas)))
            row["loss"] = row["recon"] + row["rate"]
        else:
            means = values.mean(0).tolist()
            row = {"step": step, "lr": rate, "nll": means[0], "loss": means[0], "objective": means[1]}
        self.values, self.betas = [], []
        return row


__all__ = ["fit", "training_settings", "flush_denormals", "check_sizes", "check_data", "check_inputs",
           "inputs_checked", "check_checkpoint_path", "resume_state", "FitResult", "DivergenceError", "Recipe",
           "recipe", "weighted", "learning_rate",
           "reset_parameters", "rng_state", "set_rng_state", "VAE_RECIPE", "DLGM_RECIPE", "DEFAULT_RECIPE"]
