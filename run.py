"""Hydra entry point: compose the config, build data, model and guide, fit, evaluate, write the run's outputs.

    python run.py                                   # vae at n = 1000
    python run.py model=dlgm data.n=1000            # the DLGM with its structured guide
    python run.py -m model=vae,dlgm data.n=1,5,10,100,1000 seed=0,1,2 hydra/launcher=joblib

Every run leaves status.json (ok, refused, diverged, failed, with a one-line reason) in its own directory and never
writes into another run's. A single run that fails prints one line on stderr and exits 2 (1 for a crash); a
multirun records each failed job and runs the others, then exits 1 if any job failed (see cli/__init__.py).
"""
import contextlib
import logging
import math
import os
import signal
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import cli
from cli import ConfigError, validate

log = logging.getLogger("onebit")


def build(cfg: DictConfig):
    """The data, model and guide a config describes (instantiated from the _target_ of model and guide)."""
    from hydra.utils import instantiate

    from models import OneBit

    def spec(node):
        return {k: v for k, v in OmegaConf.to_container(node).items() if k != "name"}

    data = OneBit(cfg.data.n, tuple(cfg.data.weights))
    model = instantiate(spec(cfg.model), n=data.n)
    guide = instantiate(spec(cfg.guide), model=model)
    return data, model, guide


def build_objective(cfg: DictConfig):
    """The Pyro ELBO cfg.objective names (infer.objectives.make_objective); its other keys are its options.
    K (iwae) is the particle count in place of train.num_particles."""
    from infer.objectives import ObjectiveError, make_objective

    options = {k: v for k, v in OmegaConf.to_container(cfg.objective).items() if k not in ("name", "K", "steps")}
    particles = cfg.objective.K if "K" in cfg.objective else cfg.train.num_particles
    try:
        return make_objective(cfg.objective.name, particles, **options)
    except ObjectiveError as err:
        raise ConfigError(f"objective.{err}") from None


def progress_enabled(cfg, multirun: bool) -> bool:
    if cfg.train.progress == "auto":
        return sys.stderr.isatty() and not multirun
    return bool(cfg.train.progress)


def heartbeat(steps: int, every: float = 15.0):
    """A fit callback that logs one line at most every `every` seconds (where no progress bar shows)."""
    import time

    last = [time.perf_counter()]

    def beat(step, row):
        now = time.perf_counter()
        if now - last[0] >= every:
            last[0] = now
            log.info(f"  step {step}/{steps}: training loss {row['loss']:.4f} (window mean, lattice/MC estimate)")

    return beat


def exact_model_steps(cfg) -> int:
    """The model phase's step budget of objective=exact: objective.steps.<model> (measured per model)."""
    steps = OmegaConf.select(cfg, f"objective.steps.{cfg.model.name}")
    if steps is None:
        raise ConfigError(f"objective.steps.{cfg.model.name} is not set: objective=exact needs the model phase's step "
                          f"budget for model={cfg.model.name}")
    if OmegaConf.select(cfg, "train.resume"):
        raise ConfigError("train.resume is not allowed with objective=exact (its two phases are not checkpointed)")
    return steps


class Refused(ValueError):
    """Bad input found before training started: the run leaves no trace (a multirun job records it)."""


@contextlib.contextmanager
def refusals():
    """Bad input found while building a run (a ValueError, or hydra's InstantiationException around one) raised as
    Refused, in one line."""
    try:
        yield
    except ValueError as err:
        raise Refused(str(err)) from None
    except Exception as err:  # noqa: BLE001  e.g. hydra's InstantiationException around a ValueError
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ValueError):
            raise Refused(str(cause).splitlines()[0]) from None
        raise


class Diverged(ValueError):
    """Training diverged: the last good checkpoint is kept, no normal-looking result is written."""


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
        validate(cfg)
    except ValueError as err:
        raise Refused(str(err)) from None
    import torch

    torch.set_num_threads(cfg.threads)
    import arviz  # noqa: F401  a process's fixed cost (1-2 s, with scipy.stats), paid here with torch's and pyro's,
    import pyro  # not inside the first evaluation's clock (PSIS k-hat and encodings.nc need it)

    from infer import ClosedFormELBO, fit
    from infer.checkpoint import save_checkpoint

    if cfg.replicas > 1:
        return run_replicas(cfg, out, multirun)
    with refusals():
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
    note = cli.resume_note(cfg, resume)
    if note.get("resumed", {}).get("schedule_changed"):
        log.warning(f"train.steps={cfg.train.steps} differs from the checkpoint's budget: "
                    + note["resumed"]["schedule_changed"])
    out.mkdir(parents=True, exist_ok=True)
    extra = {"config": cli.trajectory_config(cfg)}  # every checkpoint carries it: a resume is checked against it
    good = GoodCheckpoint(out, data, then=None if progress_enabled(cfg, multirun) else heartbeat(cfg.train.steps))
    head = {"model": cfg.model.name, "guide": cfg.guide.name, "objective": cfg.objective.name, "n": data.n,
            "seed": cfg.seed, **note}
    try:
        first = None
        if exact_phase:  # the model by its exact likelihood, then the guide fitted to the frozen model
            first = fit(model, None, data, elbo=marginal, steps=model_steps, lr=cfg.optim.lr,
                        lr_final=cfg.optim.lr_final, schedule=cfg.optim.schedule, adam_betas=tuple(cfg.optim.betas),
                        seed=cfg.seed, log_every=cfg.train.log_every, progress=progress_enabled(cfg, multirun),
                        threads=cfg.threads, device=cfg.device,
                        callback=None if progress_enabled(cfg, multirun) else heartbeat(model_steps))
            log.info(f"model trained by its exact likelihood: {model_steps} steps in {first.wall_seconds:.1f} s, "
                     f"final window NLL {first.history[-1]['nll']:.4f} [randomised lattice]; now the guide, "
                     "against the frozen model")
        result = fit(model, guide, data, elbo=elbo, steps=cfg.train.steps, lr=cfg.optim.lr,
                     lr_final=cfg.optim.lr_final, schedule=cfg.optim.schedule, adam_betas=tuple(cfg.optim.betas),
                     beta=cfg.train.beta, warmup=cfg.train.warmup, warmup_start=cfg.train.warmup_start,
                     average=cfg.train.average,
                     seed=cfg.seed, log_every=cfg.train.log_every, progress=progress_enabled(cfg, multirun),
                     resume=resume, checkpoint_path=out / "checkpoint.pt", threads=cfg.threads, device=cfg.device,
                     freeze_model=cfg.train.freeze_model or exact_phase, init="keep" if exact_phase else "reset",
                     checkpoint_every=cfg.train.checkpoint_every, checkpoint_extra=extra, callback=good)
    except FloatingPointError as err:
        good.discard()
        raise Diverged(str(err)) from None
    except ValueError as err:
        if type(err).__name__ == "DivergenceError":  # non-finite: history so far, metrics.json marked diverged
            diverged_outputs(out, getattr(err, "result", None), {**head, "steps": getattr(err, "step", None)},
                             str(err), good)
            raise Diverged(str(err)) from None
        good.discard()
        raise Refused(str(err)) from None
    except BaseException:  # killed (SIGINT, SIGTERM) or a crash: checkpoint.pt stays as fit left it
        good.discard()
        raise
    head.update(steps=result.steps, wall_seconds=result.wall_seconds)
    if first is not None:
        head["model_phase"] = {"objective": "exact likelihood (infer.marginal.MarginalLikelihood)",
                               "steps": first.steps, "wall_seconds": first.wall_seconds,
                               "last_window_nll": first.history[-1]["nll"]}
        head["guide_phase"] = "the guide fitted to the frozen model by the closed-form ELBO: its gap is the family's price"
        result.history = [{"phase": "model", **row} for row in first.history] + [
            {"phase": "guide", **row, "step": first.steps + row["step"]} for row in result.history]
    if not cfg.train.checkpoint_every:  # fit wrote the final one otherwise
        save_checkpoint(out / "checkpoint.pt", result, extra=extra)
    try:
        return finish(cfg, out, model, guide, data, result, head, good=good)
    finally:
        good.discard()


def diverged_outputs(out: Path, result, head: dict, reason: str, good=None) -> None:
    """What a diverged run leaves besides status.json: history.csv (the windows logged before it diverged),
    metrics.json marked diverged (no loss) and the last good checkpoint (GoodCheckpoint.restore)."""
    import pandas as pd

    note = good.restore() if good is not None else None
    pd.DataFrame(getattr(result, "history", None) or []).to_csv(out / "history.csv", index=False)
    cli.write_json(out / "metrics.json", {**head, "status": "diverged", "reason": reason, "loss": None,
                                          **({"checkpoint": note} if note else {})})


def finish(cfg, out: Path, model, guide, data, result, head: dict, good=None) -> dict:
    """After training: refuse a diverged result (history and a metrics.json saying so, the last good checkpoint),
    else evaluate and write the run's outputs into `out`; return the metrics. The objective is judged at the KL
    weight the run's last step trained with (below train.beta while the warmup lasts). Raises Diverged."""
    from analysis.report import evaluate_run, write_run
    from infer.runtime import serial_blas
    from infer.weights import kl_weight

    beta = kl_weight(max(result.steps - 1, 0), cfg.train.beta, cfg.train.warmup, cfg.train.warmup_start)
    reason = cli.divergence(result, data, beta=beta)
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
    reason = cli.divergence(result, data, beta=beta, final=metrics)
    if reason:
        metrics.update(status="diverged", reason=reason)
        if good is not None:
            metrics["checkpoint"] = good.restore()
    write_run(out, model, guide, data, result, metrics, grids, figures=cfg.eval.figures, checkpoint=False,
              title=f"{cfg.model.name} + {cfg.guide.name}, n={data.n}, seed={cfg.seed}")
    if reason:
        raise Diverged(reason)
    return metrics


def run_replicas(cfg: DictConfig, out: Path, multirun: bool = False) -> dict:
    """cfg.replicas > 1: the runs of seeds seed .. seed + replicas - 1, trained together (infer.fit_replicas), each
    evaluated and written into its own directory out/seed<s> (what its single run would write there, with the
    config of that run: seed=<s>); out gets status.json listing them. Returns {'replicas': [each replica's metrics],
    'loss': their mean headline loss}. Raises Refused before training, Diverged if any replica diverged."""
    import pyro

    from analysis.rundir import read_status, write_status
    from infer.fit_replicas import fit_replicas

    seeds = [cfg.seed + r for r in range(cfg.replicas)]
    with refusals():
        cli.check_memory(cfg, build)
        pairs = []
        for seed in seeds:
            pyro.set_rng_seed(seed)
            data, model, guide = build(cfg)
            pairs.append((model, guide))
        elbo = build_objective(cfg)
    configs = [OmegaConf.merge(cfg, {"seed": seed, "replicas": 1}) for seed in seeds]  # each one's single run
    dirs = [out / f"seed{seed}" for seed in seeds]
    logs = [replica_log(d) for d in dirs]

    def start():  # after fit_replicas' checks, before its first step: the replicas' dirs, listed in out's status
        for d, c in zip(dirs, configs):
            cli.replica_dir(d, c)
        write_status(out, "running", replicas=[d.name for d in dirs])
        for handler in logs:  # the stack's training log goes to every replica's run.log
            logging.getLogger().addHandler(handler)

    try:
        results = fit_replicas([p[0] for p in pairs], [p[1] for p in pairs], data, seeds, elbo=elbo,
                               steps=cfg.train.steps, lr=cfg.optim.lr, lr_final=cfg.optim.lr_final,
                               schedule=cfg.optim.schedule, adam_betas=tuple(cfg.optim.betas), beta=cfg.train.beta,
                               warmup=cfg.train.warmup, warmup_start=cfg.train.warmup_start,
                               average=cfg.train.average, log_every=cfg.train.log_every,
                               progress=progress_enabled(cfg, multirun),
                               threads=cfg.threads, device=cfg.device, checkpoint_every=cfg.train.checkpoint_every,
                               checkpoint_paths=[d / "checkpoint.pt" for d in dirs],
                               checkpoint_extras=[{"config": cli.trajectory_config(c)} for c in configs],
                               on_start=start)
    except ValueError as err:
        if type(err).__name__ == "DivergenceError":
            raise Diverged(str(err)) from None
        raise Refused(str(err)) from None
    except KeyboardInterrupt:
        killed = signal.Signals(cli.STATE["signal"] or signal.SIGINT).name
        for d in dirs:
            if read_status(d).get("status") == "running":
                write_status(d, "failed", cli.killed_reason(killed, d))
        raise
    finally:
        for handler in logs:
            logging.getLogger().removeHandler(handler)
    write_status(out, "running", replicas=[d.name for d in dirs])
    done, failed = [], []
    for model_guide, result, c, d, handler in zip(pairs, results, configs, dirs, logs):
        logging.getLogger().addHandler(handler)  # this replica's evaluation goes to its own run.log
        try:
            metrics = finish_replica(cfg, c, d, model_guide, data, result, failed)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if metrics is not None:
            done.append(metrics)
    if failed:

        write_status(out, "diverged", f"{len(failed)} of {len(dirs)} replicas diverged: " + "; ".join(failed),
                     replicas=[d.name for d in dirs])
        raise Diverged(f"{len(failed)} of {len(dirs)} replicas diverged: " + "; ".join(failed))
    losses = [m.get("loss") for m in done]
    mean = sum(losses) / len(losses) if None not in losses else None
    labels = sorted({str(m.get("loss_estimator")) for m in done})
    log.info(f"{len(done)} replicas (seeds {seeds[0]}..{seeds[-1]}), headline loss [{', '.join(labels)}]: "
             + ", ".join(f"{v:.4f}" for v in losses) + (f"; mean {mean:.4f}" if mean is not None else ""))
    return {"replicas": done, "loss": mean}


def replica_log(d: Path) -> logging.Handler:
    """A replica's run.log, as a single run's (conf/hydra/job_logging/onebit.yaml: stamped lines, opened at the first
    line)."""
    handler = logging.FileHandler(d / "run.log", delay=True)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    return handler


def finish_replica(cfg, c, d: Path, model_guide, data, result, failed: list):
    """Evaluate and write one replica (finish) into its dir d and record its status; a diverged replica is added
    to `failed` and gives None. Returns its metrics."""
    from analysis.report import summary_lines
    from analysis.rundir import write_status
    from infer import DivergenceError

    head = {"model": c.model.name, "guide": c.guide.name, "objective": c.objective.name, "n": data.n,
            "seed": c.seed, "replicas": cfg.replicas, "steps": c.train.steps}
    try:
        if isinstance(result, DivergenceError):
            raise Diverged(str(result))
        head["wall_seconds"] = result.wall_seconds
        metrics = finish(c, d, *model_guide, data, result, head)
    except Diverged as err:
        write_status(d, "diverged", str(err))
        failed.append(f"{d.name}: {err}")
        return None
    write_status(d, "ok", "finished", loss=metrics.get("loss"))
    for line in summary_lines(metrics):
        log.info(f"{d.name}: {line}")
    log.info(f"outputs: {d}")
    return metrics


def parallel_jobs(hc) -> int:
    """How many of a sweep's jobs run at once: the joblib launcher's n_jobs (negative as joblib reads it: -1 is
    every core), else 1 (the basic launcher runs them one after another)."""
    launcher = hc.launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n_jobs = launcher.get("n_jobs") or 1
    if n_jobs < 0:
        from infer.runtime import available_cores

        n_jobs = max(1, available_cores() + 1 + n_jobs)
    return int(n_jobs)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra task: run() into Hydra's output dir and record how it ended (status.json); log the summary; return the
    headline loss for sweepers (nan for a job that did not end well, so no sweeper mistakes it for a result)."""
    from hydra.core.hydra_config import HydraConfig

    from analysis.rundir import RunDirError

    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    from infer.runtime import oversubscription

    crowded = oversubscription(cfg.get("threads"), parallel_jobs(hc) if multirun else 1)
    if crowded:
        log.warning(crowded)
    out = Path(hc.runtime.output_dir)
    if multirun and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # a joblib worker: SIGTERM as SIGINT
        with contextlib.suppress(ValueError):  # not in the main thread: leave it
            signal.signal(signal.SIGTERM, cli.on_sigterm)
    try:
        claim = cli.claim_for(cfg, out, fresh=multirun)
    except RunDirError as err:
        if multirun:  # recorded in the sweep dir, so the summary lists it
            cli.record_unclaimed(cfg, hc, err)
        return cli.fail(None, "refused", err, multirun)
    if multirun:
        cli.clear_unclaimed(cfg, hc)
    try:
        cli.save_hydra_files(claim, cfg, hc)
        metrics = run(cfg, out, multirun=multirun)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (cli.on_sigterm): the run says it was killed, then stops
        name = signal.Signals(cli.STATE["signal"] or signal.SIGINT).name
        with contextlib.suppress(OSError):
            claim.status("failed", cli.killed_reason(name, out))
        raise
    except Refused as err:
        return cli.fail(claim, "refused", err, multirun)
    except Diverged as err:
        return cli.fail(claim, "diverged", err, multirun)
    except OSError as err:
        return cli.fail(claim, "failed", f"cannot write the run's outputs in {out}: {err.strerror or err}", multirun)
    except Exception as err:  # noqa: BLE001  a crash: one line here, the traceback in run.log
        try:
            (out / "traceback.txt").write_text(traceback.format_exc())
        except OSError:
            pass
        return cli.fail(claim, "failed", f"crashed: {type(err).__name__}: {err} (traceback in {out}/traceback.txt)",
                        multirun, code=1)
    from analysis.report import summary_lines

    for line in (summary_lines(metrics) if "replicas" not in metrics else []):  # a replica group logged its own
        log.info(line)
    claim.status("ok", "finished", loss=metrics.get("loss"))
    log.info(f"outputs: {out}")
    loss = metrics.get("loss")
    return float(loss) if loss is not None else math.nan


if __name__ == "__main__":
    sys.exit(cli.main(main, sys.argv))
