"""The record of a training run: FitResult, the logging window that turns each step's loss terms into its
history rows, the DivergenceError (with its cause in words) that ends a run at a non-finite step, and the warning
for a training that will run long (long_run_warning)."""
import math
import time
import warnings
from dataclasses import dataclass, field

import torch


class DivergenceError(ValueError):
    """Training produced a non-finite loss or gradient. `step` is the first bad step (1-based), `cause` the likely
    cause in words; `result` is the FitResult up to the last good log (its params were never checkpointed)."""

    def __init__(self, message, step=None, cause=None, result=None):
        super().__init__(message)
        self.step, self.cause, self.result = step, cause, result


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


def last_update(steps, v, result):
    return DivergenceError(f"training diverged at step {steps}: the last update made the loss non-finite (nan or "
                           f"inf); the learning rate is the likely cause: lower lr (optim.lr={v['lr']:g})",
                           step=steps, cause="lr", result=result)


def divergence(step, at_start, start, v, result, needs_guide):
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
        from .recipe import learning_rate

        cause = "lr"
        rate = learning_rate(step - 1, v["steps"], v["lr"], v["lr_final"], v["schedule"])  # <= lr (check_decay)
        what = ("the loss or its gradients became non-finite (nan or inf); the learning rate is the likely cause: "
                f"lower lr (optim.lr={v['lr']:g}; {rate:g} at that step)")
    return DivergenceError(f"training diverged at step {step}: {what}", step=step, cause=cause, result=result)


class Window:
    """The per-step loss terms since the last log, kept on the device until the log step (no sync per step)."""

    def __init__(self):
        self.values, self.betas = [], []
        self.loaded = None  # the shape of a resumed window's rows, checked against the first new one

    def add(self, vec, beta):
        if self.loaded is not None:
            if tuple(vec.shape) != self.loaded:
                from .checkpoint_check import CheckpointError

                raise CheckpointError(f"resume: its window entry holds {self.loaded[-1]} values a step, where this "
                                      f"run logs {vec.shape[-1]} (its loss terms and the objective); it cannot be "
                                      "resumed: resume another checkpoint, or start afresh")
            self.loaded = None
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
            self.loaded = tuple(self.values[0].shape) if self.values else None

    def row(self, step, rate, names, needs_guide) -> dict:
        """The window means: each term, the objective, beta. A KL term is logged unweighted, divided by each step's
        beta, so it is known only at the steps whose beta > 0: its mean is over those steps, and NaN where the whole
        window trained at beta = 0 (its rate and loss then too: the step's beta-weighted term, 0, says nothing of
        the KL)."""
        values = torch.stack(self.values).double()  # (k, T+1): the terms, then the objective
        betas = torch.tensor(self.betas, dtype=torch.float64, device=values.device)
        if needs_guide:
            kl = torch.tensor([k.startswith("kl_") for k in names] + [False], device=values.device)
            known = betas > 0
            means = values.mean(0)
            unweighted = (values[known] / betas[known].unsqueeze(1)).mean(0) if bool(known.any()) \
                else torch.full_like(means, float("nan"))
            means = torch.where(kl, unweighted, means).tolist()
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


def window_loss(row: dict) -> tuple:
    """(what, value) a progress line shows for a logged window: its loss (the -ELBO), or where that is unknown (a
    window trained at beta = 0, whose KL no step measured: Window.row) the objective it trained on."""
    loss = row.get("loss")
    if loss is not None and loss == loss:
        return "loss", loss
    return "objective (beta 0: no KL logged)", row.get("objective", float("nan"))


LONG_RUN_SECONDS = 1800  # fit warns once, after its first steps, when the rest of training will take longer
PACE_STEPS, PACE_SECONDS = 10, 5.0  # the pace is taken over the first PACE_STEPS steps, or PACE_SECONDS if sooner


# objectives whose bound is tighter than the ELBO: a guide trained by one can have a poor ELBO and still a good
# model (IWAE), so a run is judged by its own objective's last training window, not by the evaluated ELBO
TIGHTER_THAN_ELBO = ("iwae",)


def worse_than_no_latent(result, data, beta: float = 1.0, final=None, objective: str = None) -> str:
    """Why a trained run counts as diverged ('' if it does not): its objective is not finite, or it ends worse than
    the trivial solution, the collapsed code that ignores z (objective n H(w) at every beta: recon n H(w), KL 0),
    and worse than its own initial objective, by more than 1% + 0.01 nats. The objective is recon + beta KL; `final`
    is the evaluated (headline) metrics, else (and where `objective` names one in TIGHTER_THAN_ELBO, judged by its
    own bound) the last logged training window. (A short run that improved on its start but not yet on n H(w) is
    not diverged.)"""
    history = result.history
    if not history:
        return ""
    trivial = data.n * data.entropy
    if final is None or objective in TIGHTER_THAN_ELBO:
        last = history[-1].get("objective", history[-1]["loss"])
        what = "final objective" if final is None else f"final {objective} objective (last training window)"
    else:
        loss, kl = final.get("loss"), final.get("kl")
        kl_total = sum(kl.values()) if isinstance(kl, dict) else 0.0
        last = None if loss is None else loss + (beta - 1.0) * kl_total
        what = f"final objective [{final.get('loss_estimator', 'headline')}]"
    if last is None or not math.isfinite(last):
        return f"training diverged: the loss became {last} by step {history[-1]['step']}"
    start = getattr(result, "initial_loss", None)
    worst = max(trivial, start if start is not None and math.isfinite(start) else -math.inf)
    bound = worst + 0.01 * worst + 0.01
    if last <= bound:
        return ""
    above = [row for row in history if row.get("phase") != "model"  # objective=exact's model phase: its NLL
             and not row.get("objective", row.get("loss")) <= bound]  # nan included
    first = (f"; its logged objective first went above them at step {above[0]['step']} "
             f"({above[0].get('objective', above[0].get('loss')):.4g})") if above else ""
    return (f"training diverged: the {what} {last:.4g} is above the no-latent loss n*H(w) = {trivial:.4g}"
            + (f" and the initial objective {start:.4g}" if start is not None else "") + first
            + ": the run learned less than a decoder that ignores z")


def duration(seconds: float) -> str:
    """A time span as people read it: '42 s', '12 min', '3.1 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def long_run_warning(done: int, elapsed: float, left: int):
    """The one-line warning for a training that will run LONG_RUN_SECONDS or more at the pace of its first `done`
    steps (`elapsed` seconds), `left` steps to go; None for a shorter one."""
    remaining = elapsed / done * left
    if remaining < LONG_RUN_SECONDS:
        return None
    return (f"fit: training will take about {duration(remaining)} more ({left} steps at {elapsed / done:.3g} s a step, "
            f"timed over the first {done}); a step's cost grows with the particles (or IWAE's K) and with n")


class LongRunWarning:
    """Warns once (warnings.warn) when a training loop's remaining steps will take LONG_RUN_SECONDS or more, at the
    pace of its first PACE_STEPS steps (or of those done in PACE_SECONDS, if sooner): infer.fit's loop and a stack of
    replicas' call step_done(step) after each step (0-based, counted from `start`; `t0` the loop's start time)."""

    def __init__(self, start: int, steps: int, t0: float):
        self.start, self.steps, self.t0, self.done = start, steps, t0, False

    def step_done(self, step: int) -> None:
        if self.done:
            return
        elapsed, count = time.perf_counter() - self.t0, step + 1 - self.start
        if count >= PACE_STEPS or elapsed >= PACE_SECONDS:
            self.done = True
            said = long_run_warning(count, elapsed, self.steps - step - 1)
            if said:
                warnings.warn(said, stacklevel=3)


__all__ = ["FitResult", "DivergenceError", "divergence", "worse_than_no_latent", "TIGHTER_THAN_ELBO",
           "last_update", "Window", "duration", "long_run_warning",
           "LongRunWarning", "LONG_RUN_SECONDS"]
