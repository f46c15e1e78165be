"""The training loop of a stack of replicas (infer.stacked.StackedReplicas): infer.fit's loop for R runs at once.

Each step trains all R replicas (the sum of their objectives; Adam is elementwise). Logs, checkpoints and the
divergence guard are per replica, as infer.fit does for one run: a replica that diverges is reported as its single
run would be (its DivergenceError holds its history up to the last good log) and the others go on. The loop runs
with MKL on the stack's thread count (stack.blas: runtime.batched_blas_threads, the same bits as one thread).
"""
import time
import warnings

import pyro
import torch
from tqdm.auto import tqdm

from .average import ParameterAverage, average_start
from .checks import elbo_recipe
from .engine import check_plan
from .recipe import learning_rate
from .result import FitResult, LongRunWarning, Window, divergence, last_update
from .runtime import blas_threads
from .replicas import unstack
from .weights import kl_weight


def train(stack, callback) -> list:
    """Train a StackedReplicas for its steps: per step one stacked step (the joint traced plan, or the eager stacked
    step), Adam, the parameter average; per log step each replica's row, callback(r, step, row), and its divergence
    check; checkpoints per replica. Returns one FitResult (the replica's params back in its own model and guide) or
    DivergenceError per replica."""
    v, R = stack.v, stack.R
    steps, log_every, every = v["steps"], v["log_every"], v["checkpoint_every"]
    label = f"{stack.engine}, {R} replicas stacked" + (f", matmuls on {stack.blas} threads" if stack.blas > 1 else "")
    results = [FitResult(optimizer=stack.optimizer, buffers={}, engine=label,
                         setup_seconds=stack.setup_seconds,
                         recipe={**{k: v[k] for k in ("steps", "lr", "lr_final", "schedule", "beta", "warmup",
                                                      "warmup_start", "average")},
                                 "seed": seed, "replicas": stack.group, "adam_betas": tuple(v["adam_betas"]),
                                 **elbo_recipe(stack.elbo), "objective": "ClosedFormELBO",  # each replica's
                                 "log_every": log_every,
                                 "freeze_model": v["freeze_model"], "init": "reset"}) for seed in stack.seeds]
    errors = [None] * R
    found = torch.zeros(R, dtype=torch.bool, device=stack.x.device)  # sticky: from a replica's first bad step on
    bad = torch.zeros(R, device=stack.x.device)  # how many steps since (and with) its first non-finite one
    values, betas, names = [], [], None
    averaged = ParameterAverage(stack.params, average_start(steps, v["average"]))  # elementwise: per replica
    t0 = time.perf_counter()

    def window_of(r):
        if not values:
            return None
        return {"values": torch.stack([vec[:, r] for vec in values]).cpu(), "betas": list(betas)}

    bar = tqdm(range(steps), disable=not v["progress"], desc=f"fit x{R}", dynamic_ncols=True, mininterval=0.5)
    optimizer_step = stack.optimizer.update if stack.fused else stack.optimizer.step  # as in infer.fit
    pace = LongRunWarning(0, steps, t0)
    with pyro.validation_enabled(False), warnings.catch_warnings(), blas_threads(stack.blas):
        warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
        for step in bar:
            pending = None
            if stack.paths and every and step % every == 0 and step > 0:
                pending = [(stack._rng(r), window_of(r), stack.replica_average(r, averaged)) for r in range(R)]
            rate = learning_rate(step, steps, v["lr"], v["lr_final"], v["schedule"])
            beta = kl_weight(step, v["beta"], v["warmup"], v["warmup_start"])
            for group in stack.optimizer.param_groups:
                group["lr"] = rate
            stack.optimizer.zero_grad(set_to_none=True)
            if stack.plan is not None:  # the joint graph sets the gradients of the summed objectives
                names, means, losses = stack.plan(beta)
            else:
                names, means, losses = stack._eager(beta)
                losses.sum().backward()
            vec = torch.cat([means, losses.unsqueeze(0)]).detach()  # (T + 1, R)
            found |= ~torch.isfinite(vec).all(0)
            bad.add_(found)
            if step == 0:
                for r in range(R):
                    results[r].initial_loss = float(vec[-1, r])
            if pending is not None:
                counts = bad.tolist()
                for r in range(R):
                    if errors[r] is None and counts[r] == 0:
                        stack.checkpoint(r, results[r], step, *pending[r])
            if stack.plan is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
                check_plan(stack.plan, step + 1)  # fit's check: the plan against its eager forward
            optimizer_step()
            averaged.update(step + 1)
            pace.step_done(step)
            values.append(vec)
            betas.append(beta)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                counts = bad.tolist()
                stacked = torch.stack(values)  # (k, T + 1, R)
                for r in range(R):
                    if errors[r] is not None:
                        continue
                    if counts[r] > 0:
                        first = step + 1 - int(counts[r]) + 1  # replica r's first non-finite step
                        errors[r] = divergence(first, first == 1, 0, v, results[r], True)
                        continue
                    window = Window()
                    window.values, window.betas = list(stacked[..., r].unbind(0)), list(betas)
                    row = window.row(step + 1, rate, names, True)
                    results[r].history.append(row)
                    if callback is not None:
                        callback(r, step + 1, row)
                values, betas = [], []
                if all(e is not None for e in errors):
                    break
    wall = time.perf_counter() - t0 + stack.setup_seconds
    averaged.apply()
    _final_check(stack, errors, results, steps)
    unstack(stack.model, stack.models)
    unstack(stack.guide, stack.guides)
    out = []
    for r in range(R):
        results[r].steps, results[r].wall_seconds = steps, wall
        results[r].window = window_of(r)
        if errors[r] is None and stack.paths:
            stack.checkpoint(r, results[r], steps, stack._rng(r), results[r].window)
        out.append(errors[r] if errors[r] is not None else results[r])
    return out

def _final_check(stack, errors, results, steps):
    """One more evaluation at the final parameters (no gradients, generators untouched): a replica whose last
    update made its loss non-finite is diverged."""
    states = stack._states()
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            _, means, losses = stack._eager(kl_weight(steps - 1, stack.v["beta"], stack.v["warmup"],
                                                     stack.v["warmup_start"]))
        finite = (torch.isfinite(means).all(0) & torch.isfinite(losses)).tolist()
    finally:
        stack._restore(states)
    for r, ok in enumerate(finite):
        if errors[r] is None and not ok:
            errors[r] = last_update(steps, stack.v, results[r])

