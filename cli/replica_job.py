"""A run with replicas > 1: seeds seed .. seed + replicas - 1 trained together (infer.fit_replicas), each evaluated
and written into a directory of its own as its single run would be."""
import logging
import signal
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import cli
from cli.build import Diverged, Refused, build, build_objective, refusals
from cli.guards import explained
from cli.job import commit_claim, finish, objective_facts, progress_enabled, recipe_fact

log = logging.getLogger("onebit")


def run_replicas(cfg: DictConfig, out: Path, multirun: bool = False) -> dict:
    """cfg.replicas > 1: the runs of seeds seed .. seed + replicas - 1, trained together (infer.fit_replicas), each
    evaluated and written into its own directory out/seed<s> (what its single run would write there, with the
    config of that run: seed=<s>); out gets status.json listing them. Returns {'replicas': [each replica's metrics],
    'loss': their mean headline loss}. Raises Refused before training, Diverged if any replica diverged."""
    import pyro

    from analysis.rundir import read_status, write_status
    from infer.fit_replicas import fit_replicas

    seeds = [cfg.seed + r for r in range(cfg.replicas)]
    with refusals(cfg):
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
        commit_claim(out)
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
            raise Diverged(explained(err, cfg)) from None
        raise Refused(explained(err, cfg)) from None
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
    from infer.runtime import machine

    head = {"model": c.model.name, "guide": c.guide.name, "objective": c.objective.name, "n": data.n,
            "seed": c.seed, **objective_facts(c), **recipe_fact(), "replicas": cfg.replicas, "steps": c.train.steps,
            "machine": machine()}
    try:
        if isinstance(result, DivergenceError):
            raise Diverged(explained(result, c))
        head["wall_seconds"], head["engine"] = result.wall_seconds, result.engine
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
