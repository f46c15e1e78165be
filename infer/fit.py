"""fit(): stochastic variational inference as a plain loop over a Pyro ELBO, callable without Hydra.

One recipe per model (infer.recipe) gives fit's defaults and the command line's. The loop's parts live in their own
modules: infer.prepare (everything before the first step), infer.engine (which path computes the loss),
infer.result (the history, the logging window and DivergenceError).
"""
import math
import time
import warnings

import pyro
import torch
from tqdm.auto import tqdm

from .average import ParameterAverage, average_start
from .checkpoint import module_buffers, resume_state, rng_state, save_checkpoint
from .checks import check_arguments, check_callable, checked_device, check_data, elbo_recipe, warn_budget_change
from .elbo import ClosedFormELBO
from .engine import check_plan, final_check, loss_closure
from .prepare import adam, prepare, restore
from .recipe import learning_rate, recipe
from .result import FitResult, LongRunWarning, Window, divergence, last_update, window_loss
from .runtime import training_settings
from .weights import kl_weight


def fit(model, guide, data, *, elbo=None, steps: int = None, lr: float = None, lr_final: float = None,
        schedule: str = None, adam_betas=None, beta: float = 1.0, warmup: int = 0, warmup_start: float = 0.0,
        seed=None, log_every: int = 100, progress: bool = False, resume: dict = None, callback=None,
        checkpoint_path=None, checkpoint_every: int = 0, checkpoint_extra: dict = None, threads=1,
        init: str = "reset", freeze_model: bool = False, device="cpu", engine: str = "auto",
        average: float = None, on_start=None) -> FitResult:
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

    freeze_model=True trains only the guide's params (those not touched by the model alone), the model is frozen
    and never reset: init="reset" then draws the guide's params alone from the seed, so a model trained before (e.g.
    by infer.marginal.MarginalLikelihood, objective=exact) is the one the guide is fitted to, and
    fit(model, guide, data, seed=s, freeze_model=True) after that fit is the command line's guide phase.
    An objective with `needs_guide = False` (e.g. infer.marginal.MarginalLikelihood) trains the model alone by
    `elbo.marginal_terms(model, data)['nll']`; guide may then be None, and rows hold step, lr, nll, loss (= nll)
    and objective (= nll).

    Divergence: every step's loss, loss terms and gradients are checked for finiteness on the device (no host
    sync); a non-finite step is skipped by the optimizer, and the next log (or checkpoint) raises DivergenceError
    (one line: the first bad step and the likely cause). The final parameters are checked by one more evaluation.
    A checkpoint is written only of parameters whose loss and gradients were finite, so the last good one survives.

    `resume` is a checkpoint dict (infer.checkpoint.load_checkpoint(path)) or its path: training continues from
    its step with its params (checked by name and shape), optimiser, RNG states, history and partial logging
    window, and gives the same history as an uninterrupted run. A checkpoint records the settings it was trained
    with (its 'fit' entry: the result's recipe); a resume that changes one that decides the trajectory or the
    history (infer.checks.TRAJECTORY: lr, schedule, beta, warmup, average, the objective, its particles, noise,
    free bits and closed_form, vectorize_particles, log_every, freeze_model, the seed; Adam's betas) is refused in
    one line (seed=None takes the checkpoint's seed: its RNG states are restored, so the run is that seed's), and a
    changed `steps` warns once the checkpoint is restored (the lr schedule changes). Every `log_every` steps the
    window mean of each
    loss term is appended to the history, with the KL terms unweighted. With checkpoint_path (a file in a folder
    that exists), a checkpoint (with the dict checkpoint_extra's entries) is written at the end and, with
    checkpoint_every > 0, every checkpoint_every steps: checkpoint_every=0 means "only at the end", as the command
    line's train.checkpoint_every=0. The KL terms are weighted by `beta` through LatentScale (poutine-style scaling
    of the latent sites of model and guide); with `warmup` > 0 the weight rises linearly from warmup_start * beta
    to beta over that many steps. `callback(step, row)` runs at each log; `on_start()` once, after every check
    and before the first step (the command line commits a replacement run's claim there).

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
    check_arguments(model, guide, data, elbo, steps, resume, values, callback, checkpoint_path, checkpoint_extra)
    if on_start is not None:
        check_callable("on_start", on_start, "a callable on_start(), or None", 0)
    device = checked_device(device)
    with training_settings(threads):
        return _fit(model, guide, data, elbo, {**values, "on_start": on_start}, resume, callback, checkpoint_path,
                    checkpoint_extra, device)


def _fit(model, guide, data, elbo, v, resume, callback, checkpoint_path, checkpoint_extra, device):
    s = prepare(model, guide, data, elbo, v, device, start=0 if resume is None else int(resume["step"]))
    guide, x, needs_guide, names, store, trained, params, scale = (
        s.guide, s.x, s.needs_guide, s.names, s.store, s.trained, s.params, s.scale)
    fused, optimizer = adam(params, v, device)
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


def _train(model, guide, data, elbo, v, resume, callback, checkpoint_path, checkpoint_extra, device, names, store,
           params, fused, optimizer, x, needs_guide, scale, model_w, guide_w, frozen):
    steps, log_every, checkpoint_every = v["steps"], v["log_every"], v["checkpoint_every"]
    start = 0 if resume is None else int(resume["step"])
    result = FitResult(optimizer=optimizer, buffers=module_buffers(model, guide),
                       recipe={**{k: v[k] for k in ("steps", "lr", "lr_final", "schedule", "beta", "warmup",
                                                    "warmup_start", "seed", "average")},
                               **({"seed": (resume.get("fit") or {}).get("seed")}  # a resume continues its seed
                                  if resume is not None and v["seed"] is None else {}),
                               "adam_betas": tuple(v["adam_betas"]), **elbo_recipe(elbo),
                               "log_every": log_every, "freeze_model": v["freeze_model"],
                               # the parameters it started from: drawn from the seed ("reset") or kept ("keep"); a
                               # resumed run's are its first session's
                               "init": (resume.get("fit") or {}).get("init", "reset") if resume is not None
                               else v["init"]})
    window = Window()
    averaged = ParameterAverage(params, average_start(steps, v["average"]))
    if resume is not None:
        restore(resume, names, store, result, window, device)
        warn_budget_change(resume, steps, stacklevel=4)  # fit <- _fit <- _train: the caller of fit
        averaged.load(resume.get("average"), device, int(resume["step"]))
        for group in optimizer.param_groups:  # a checkpoint of another Adam variant: same state, our kernel
            group["fused"] = fused or None

    setup = time.perf_counter()
    before = trained_seconds(resume)  # a resumed run's training time counts its earlier sessions'
    compute, term_names, result.engine, plan = loss_closure(
        elbo, model, guide, data, x, scale, model_w, guide_w, params, needs_guide, log_every, steps - start, device,
        v["engine"])
    result.engine = resumed_engine((resume or {}).get("engine"), result.engine, start, steps)
    backward_done = getattr(compute, "backward_done", False)
    found_inf = torch.zeros((), device=device)  # sticky: 1 from the first non-finite step on
    bad = torch.zeros((), device=device)  # how many steps since (and with) the first non-finite one
    one = torch.ones((), device=device)

    def first_bad(done):  # done: steps completed; the first bad step, 1-based, or None
        count = int(bad.item())
        return None if count == 0 else done - count + 1

    def diverged(step, at_start):
        return divergence(step, at_start, start, v, result, needs_guide)

    def write_checkpoint(at, rng, window_state, average_state):
        result.steps, result.wall_seconds = at, before + time.perf_counter() - setup  # the checkpoint records both
        if torch.is_tensor(result.initial_loss):
            result.initial_loss = float(result.initial_loss)
        save_checkpoint(checkpoint_path, result, extra=checkpoint_extra, rng=rng, window=window_state,
                        average=average_state)

    if v.get("on_start") is not None:  # every check passed, the engine chosen: the first step comes next
        v["on_start"]()
    t0 = time.perf_counter()
    result.setup_seconds = t0 - setup
    bar = tqdm(range(start, steps), disable=not v["progress"], desc="fit", dynamic_ncols=True, mininterval=0.5)
    pace = LongRunWarning(start, steps, t0)
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
                check_plan(plan, step + 1)  # before the update: the same params as the traced call
            if fused:  # the fused kernel skips the update (and its step count) when found_inf is set
                optimizer.found_inf, optimizer.grad_scale = found_inf, None
            optimizer_step()
            averaged.update(step + 1)
            pace.step_done(step)
            window.add(vec, scale.beta)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                if first_bad(step + 1) is not None:
                    raise diverged(first_bad(step + 1), first_bad(step + 1) == start + 1)
                row = window.row(step + 1, rate, term_names, needs_guide)
                result.history.append(row)
                if torch.is_tensor(result.initial_loss):
                    result.initial_loss = float(result.initial_loss)
                what, value = window_loss(row)
                bar.set_postfix({what.split()[0]: f"{value:.4f}"}, refresh=False)  # loss, or objective at beta 0
                if callback is not None:
                    callback(step + 1, row)
    averaged.apply()
    if start < steps and not final_check(compute, start, steps):
        raise last_update(steps, v, result)
    result.steps, result.wall_seconds = steps, before + time.perf_counter() - setup
    result.window = window.state()
    if torch.is_tensor(result.initial_loss):
        result.initial_loss = float(result.initial_loss)
    if checkpoint_path:  # also with checkpoint_every=0 ("only at the end", as on the command line), and for a resume
        write_checkpoint(steps, rng_state(), result.window, None)  # of a finished run: its params are the average
    return result


__all__ = ["fit"]


def resumed_engine(earlier, engine: str, start: int, steps: int = None) -> str:
    """The path that trained a run, over all its sessions: `engine` (this session's, from step start + 1 to steps),
    or, where its checkpoint's run had trained on another, e.g. 'graph to step 280, then fast' (a session on the
    path of the one before it adds nothing, and so does a session that trains no step: start == steps)."""
    if not isinstance(earlier, str) or not earlier or not start:
        return engine
    if steps is not None and steps <= start:  # a resumed finished run: only its checkpoint's path trained it
        return earlier
    if earlier.rpartition(", then ")[2] == engine:  # the path its last session trained on goes on
        return earlier
    return f"{earlier} to step {start}, then {engine}"


def trained_seconds(resume) -> float:
    """The training seconds a checkpoint's run had spent before it was written (0 for a fresh run, or a checkpoint
    written before they were recorded)."""
    value = (resume or {}).get("wall_seconds")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 else 0.0
