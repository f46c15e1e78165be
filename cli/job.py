"""One run of the command line (run.py's task): build from the config, fit, evaluate, write the run's outputs.

run() refuses bad input before training (Refused), keeps the last good checkpoint while training (GoodCheckpoint),
and marks a diverged run as such (Diverged, metrics.json without a loss); finish() evaluates and writes. A config
with replicas > 1 goes to cli.replica_job.
"""
import contextlib
import logging
import math
import os
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig

import cli
from cli.build import Diverged, Refused, build, build_objective, exact_model_steps, refusals
from cli.guards import explained

log = logging.getLogger("onebit")


def progress_enabled(cfg, multirun: bool) -> bool:
    if cfg.train.progress == "auto":
        return sys.stderr.isatty() and not multirun
    return bool(cfg.train.progress)


def heartbeat(steps: int, every: float = 15.0):
    """A fit callback that logs one line at most every `every` seconds (where no progress bar shows), with the
    training time left at the pace since the first logged window."""
    import time

    from infer.result import duration, window_loss

    last, first = [time.perf_counter()], []  # first: (step, time) of the first logged window, for the pace

    def beat(step, row):
        now = time.perf_counter()
        if not first:
            first.append((step, now))
        if now - last[0] >= every:
            last[0] = now
            left = ""
            if step > first[0][0]:
                left = f"; about {duration((now - first[0][1]) / (step - first[0][0]) * (steps - step))} left"
            what, value = window_loss(row)
            log.info(f"  step {step}/{steps}: training {what} {value:.4f} (window mean, lattice/MC estimate)" + left)

    return beat


@contextlib.contextmanager
def warnings_logged():
    """Python warnings raised while a job runs (fit's fallback to the general path, a long training, ...) go to the
    job's log, the console and run.log, one line each, in place of Python's two lines with a source line."""
    import warnings

    previous = warnings.showwarning
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.warning(str(message))
    try:
        yield
    finally:
        warnings.showwarning = previous


GOOD = ".checkpoint.good.pt"  # a hard link to the last checkpoint.pt written before a good training window


class GoodCheckpoint:
    """Keeps the last good checkpoint of a run, so that a run that diverges leaves that one, not its diverged
    parameters. A fit callback: at every logged window whose objective is finite and not above the no-latent loss
    n H(w) by more than 1% + 0.01 nats (cli.divergence's bound; a window still above it, or one that follows a
    blow-up, is not called good), the checkpoint.pt
    written so far (by a step at or before that window's end) is hard-linked as <out>/.checkpoint.good.pt (a save
    replaces checkpoint.pt by rename, so the link keeps its content). A checkpoint.pt there before training (an
    in-place resume's) counts as good. restore() puts it back as checkpoint.pt (or removes a checkpoint.pt written
    after no good window); discard() removes the link."""

    def __init__(self, out: Path, data, then=None):
        self.path, self.good = Path(out) / "checkpoint.pt", Path(out) / GOOD
        self.trivial, self.step, self.then = data.n * data.entropy, None, then
        self.discard()
        if self.path.is_file():
            self._link("the checkpoint resumed")

    def _link(self, step) -> None:
        tmp = self.good.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        os.link(self.path, tmp)
        os.replace(tmp, self.good)
        tmp.unlink(missing_ok=True)  # rename does nothing where both already name one file: tmp would stay
        self.step = step

    def __call__(self, step, row) -> None:
        value = row.get("objective", row.get("loss"))
        if value is None or not math.isfinite(value):
            return
        if value <= self.trivial * 1.01 + 0.01 and self.path.is_file():
            self._link(f"by step {step}")
        if self.then is not None:
            self.then(step, row)

    def restore(self) -> str:
        """Put the last good checkpoint back as checkpoint.pt; return what metrics.json says of it."""
        if self.good.is_file():
            os.replace(self.good, self.path)
            return f"checkpoint.pt is the last good one (written {self.step}), not the diverged parameters"
        self.path.unlink(missing_ok=True)
        return ("no checkpoint.pt: none was written by a good window (objective within n H(w)) before the run "
                "diverged")

    def discard(self) -> None:
        self.good.unlink(missing_ok=True)
        self.good.with_suffix(".tmp").unlink(missing_ok=True)


def run(cfg: DictConfig, out: Path, multirun: bool = False) -> dict:
    """Train the configured model/guide pair, evaluate it, write its outputs into `out`; return the metrics.
    Raises Refused on any bad input found before training, Diverged when training diverges (metrics.json then
    says so), and lets other errors through."""
    try:
        cli.validate(cfg)
    except ValueError as err:
        raise Refused(str(err)) from None
    import torch

    torch.set_num_threads(cfg.threads)
    import arviz  # noqa: F401  a process's fixed cost (1-2 s, with scipy.stats), paid here with torch's and pyro's,
    import pyro  # not inside the first evaluation's clock (PSIS k-hat and encodings.nc need it)

    from analysis.describe import GUIDE_PHASE, model_phase_facts, model_phase_record, two_phase_history
    from infer import ClosedFormELBO, fit
    from infer.runtime import machine

    if cfg.replicas > 1:
        from cli.replica_job import run_replicas

        return run_replicas(cfg, out, multirun)
    with refusals(cfg):
        cli.check_memory(cfg, build)  # from the config: nothing n-wide is allocated before it passes
        pyro.set_rng_seed(cfg.seed)
        data, model, guide = build(cfg)
        elbo = build_objective(cfg)  # fit() refuses an objective that is invalid for the guide, before training
        exact_phase = not getattr(elbo, "needs_guide", True)
        marginal = elbo if exact_phase else None  # objective=exact: the model phase's objective
        if exact_phase:
            model_steps = exact_model_steps(cfg)
            elbo = ClosedFormELBO(num_particles=cfg.train.num_particles, noise="lattice")  # the guide phase's
        resume = cli.load_resume(cfg)
        first = resumed_model_phase(resume, cfg) if exact_phase and resume is not None else None
    note = cli.resume_note(cfg, resume)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"config": cli.trajectory_config(cfg)}  # every checkpoint carries it: a resume is checked against it
    good = GoodCheckpoint(out, data, then=None if progress_enabled(cfg, multirun) else heartbeat(cfg.train.steps))
    head = {"model": cfg.model.name, "guide": cfg.guide.name, "objective": cfg.objective.name, "n": data.n,
            "seed": cfg.seed, **objective_facts(cfg), **recipe_fact(), **note, "machine": machine()}
    try:
        if first is not None:  # the guide phase's checkpoint: the model phase is over, its model frozen in the
            extra["model_phase"] = resume["model_phase"]  # checkpoint's params
        elif exact_phase:  # the model by its exact likelihood, then the guide fitted to the frozen model
            first = fit(model, None, data, elbo=marginal, steps=model_steps, lr=cfg.optim.lr,
                        lr_final=cfg.optim.lr_final, schedule=cfg.optim.schedule, adam_betas=tuple(cfg.optim.betas),
                        seed=cfg.seed, log_every=cfg.train.log_every, progress=progress_enabled(cfg, multirun),
                        threads=cfg.threads, device=cfg.device, on_start=lambda: commit_claim(out),
                        callback=None if progress_enabled(cfg, multirun) else heartbeat(model_steps))
            extra["model_phase"] = model_phase_record(first)  # so that a resume of the guide phase reports it
            log.info(f"model trained by its exact likelihood: {model_steps} steps in {first.wall_seconds:.1f} s, "
                     f"final window NLL {first.history[-1]['nll']:.4f} [randomised lattice]; now the guide, "
                     "against the frozen model")
        with warnings.catch_warnings():  # a changed step budget: the note below says so in the config's words
            warnings.filterwarnings("ignore", message=r"steps=\d+ differs from the checkpoint's budget")
            result = fit(model, guide, data, elbo=elbo, steps=cfg.train.steps, lr=cfg.optim.lr,
                         lr_final=cfg.optim.lr_final, schedule=cfg.optim.schedule, adam_betas=tuple(cfg.optim.betas),
                         beta=cfg.train.beta, warmup=cfg.train.warmup, warmup_start=cfg.train.warmup_start,
                         average=cfg.train.average,
                         seed=cfg.seed, log_every=cfg.train.log_every, progress=progress_enabled(cfg, multirun),
                         resume=resume, checkpoint_path=out / "checkpoint.pt", threads=cfg.threads, device=cfg.device,
                         freeze_model=cfg.train.freeze_model or exact_phase,  # the model kept, the guide drawn
                         checkpoint_every=cfg.train.checkpoint_every, checkpoint_extra=extra, callback=good,
                         on_start=lambda: commit_claim(out))
    except FloatingPointError as err:
        good.discard()
        raise Diverged(str(err)) from None
    except ValueError as err:
        if type(err).__name__ == "DivergenceError":  # non-finite: history so far, metrics.json marked diverged
            reason = explained(err, cfg)
            diverged_outputs(out, getattr(err, "result", None), {**head, "steps": getattr(err, "step", None)},
                             reason, good)
            raise Diverged(reason) from None
        good.discard()
        raise Refused(explained(err, cfg)) from None
    except BaseException:  # killed (SIGINT, SIGTERM) or a crash: checkpoint.pt stays as fit left it
        good.discard()
        raise
    if note.get("resumed", {}).get("schedule_changed"):  # once the checkpoint was restored (not before a refusal)
        log.warning(f"train.steps={cfg.train.steps} differs from the checkpoint's budget: "
                    + note["resumed"]["schedule_changed"])
    head.update(steps=result.steps, wall_seconds=result.wall_seconds, engine=result.engine)
    if first is not None:  # as write_run(..., model_phase=first) records a Python run of both phases
        head["model_phase"], head["guide_phase"] = model_phase_facts(first), GUIDE_PHASE
        result.history = two_phase_history(first, result)
    try:
        return finish(cfg, out, model, guide, data, result, head, good=good)
    finally:
        good.discard()


def resumed_model_phase(resume, cfg):
    """objective=exact resumed: the model phase its checkpoint records (steps, wall_seconds, engine, history), as
    fit's result would give it; the checkpoint's params hold the model it trained. A checkpoint without it (written
    before the guide phase recorded it) cannot report the model phase: refused."""
    from types import SimpleNamespace

    phase = resume.get("model_phase")
    if not isinstance(phase, dict) or not phase.get("history"):
        raise Refused(f"train.resume={cfg.train.resume}: the checkpoint does not record the model phase of "
                      "objective=exact (written by an older version); run it again")
    log.info(f"model phase of objective=exact restored from the checkpoint ({phase['steps']} steps); resuming the "
             f"guide at step {int(resume['step'])}")
    return SimpleNamespace(**phase)


def commit_claim(out: Path) -> None:
    """Training starts (fit's on_start: after every check of fit's too): the files of the run this one replaces
    (overwrite=true) go now (analysis.claim.Claim.commit). Until then every failure, a crash too, puts them back
    (run.py)."""
    claim = cli.STATE.get("claim")
    from analysis.rundir import run_path

    if claim is not None and Path(claim.path) == run_path(out):
        claim.commit()


def objective_facts(cfg) -> dict:
    """What the run minimised where that was not the -ELBO its metrics report (analysis.run_outputs.trained_on: a KL
    weight other than 1, a warm-up longer than the run, free bits, the IWAE bound), from its config; else {}."""
    from analysis.describe import trained_on

    objective = cfg.objective
    return trained_on(objective.name, cfg.train.beta, cfg.train.warmup, cfg.train.warmup_start, cfg.train.steps,
                      objective.get("free_bits", 0.0), objective.get("K"))


def recipe_fact() -> dict:
    """{'recipe': 'conf/recipe/<objective>_<model>.yaml'} where the run composed one (conf/config.yaml's optional
    `recipe: ${objective}_${model}`: its settings replace the model option's defaults, so the run says so beside its
    model's name); {} where none applied or no Hydra app runs."""
    from hydra.core.hydra_config import HydraConfig

    try:
        runtime = HydraConfig.get().runtime
    except ValueError:  # run.run called without Hydra's app (a test, a notebook)
        return {}
    choice = runtime.choices.get("recipe")  # interpolated whether or not the optional file exists: look for it,
    if not choice:  # in the search path's order (the first found is the one composed)
        return {}
    conf = Path(__file__).resolve().parents[1] / "conf"
    for source in (s for s in runtime.config_sources if s.schema == "file"):
        path = Path(source.path, "recipe", f"{choice}.yaml")
        if path.is_file():  # conf/'s named as Python's runs name it (analysis.describe), one's own by its path
            return {"recipe": f"conf/recipe/{choice}.yaml" if Path(source.path).resolve() == conf else str(path)}
    return {}


def diverged_outputs(out: Path, result, head: dict, reason: str, good=None) -> None:
    """What a diverged run leaves besides status.json: history.csv (the windows logged before it diverged),
    metrics.json marked diverged (no loss) and the last good checkpoint (GoodCheckpoint.restore)."""
    import pandas as pd

    from analysis.rundir import write_atomic

    note = good.restore() if good is not None else None
    write_atomic(out / "history.csv", pd.DataFrame(getattr(result, "history", None) or []).to_csv(index=False))
    cli.write_json(out / "metrics.json", {**head, "status": "diverged", "reason": reason, "loss": None,
                                          **({"checkpoint": note} if note else {})})


def finish(cfg, out: Path, model, guide, data, result, head: dict, good=None) -> dict:
    """After training: refuse a diverged result (history and a metrics.json saying so, the last good checkpoint),
    else evaluate and write the run's outputs into `out`; return the metrics. The objective is judged at the KL
    weight the run's last step trained with (below train.beta while the warmup lasts). Raises Diverged."""
    from analysis.report import evaluate_run
    from analysis.run_outputs import write_outputs
    from infer.runtime import serial_blas
    from infer.weights import kl_weight

    beta = kl_weight(max(result.steps - 1, 0), cfg.train.beta, cfg.train.warmup, cfg.train.warmup_start)
    reason = cli.divergence(result, data, beta=beta, cfg=cfg)
    if reason:
        diverged_outputs(out, result, head, reason, good)
        raise Diverged(reason)
    from infer.average import average_start

    window = result.steps - average_start(result.steps, cfg.train.average)
    averaged = f" (final parameters: the mean of the last {window} iterates)" if window else ""
    log.info(f"trained {result.steps} steps in {result.wall_seconds:.1f} s{averaged}; evaluating (exact quadrature "
             "where it runs, Monte Carlo, PSIS k-hat) ...")
    with serial_blas():  # as in training: the thread count changes no number
        metrics, grids = evaluate_run(model, guide, data, cfg, result)
    metrics = {**head, **metrics}
    reason = cli.divergence(result, data, beta=beta, final=metrics, cfg=cfg)
    if reason:
        # no normal-looking headline: the loss that was judged stays, under a name that says so
        metrics.update(status="diverged", reason=reason, loss=None, loss_judged_diverged=metrics.get("loss"))
        if good is not None:
            metrics["checkpoint"] = good.restore()
    metrics = write_outputs(out, model, guide, data, result, metrics, grids, figures=cfg.eval.figures,
                            checkpoint=False, from_config=True)  # its dir claimed; its overrides in .hydra/
    if reason:
        raise Diverged(reason)
    return metrics
