"""Hydra entry point: compose the config, build data, model and guide, fit, evaluate, write the run's outputs.

    python run.py                                   # vae at n = 1000
    python run.py model=dlgm data.n=1000            # the DLGM with its structured guide
    python run.py -m model=vae,dlgm data.n=1,5,10,100,1000 seed=0,1,2 hydra/launcher=joblib

Every run leaves status.json (ok, refused, diverged, failed, with a one-line reason) in its own directory and never
writes into another run's. A single run that fails prints one line on stderr and exits 2 (1 for a crash); a
multirun records each failed job and runs the others, then exits 1 if any job failed (see cli/__init__.py).
The run itself is cli.job.run (cli.replica_job for replicas > 1); main, here, is Hydra's task around it: it claims
the output directory, records how the run ended and returns the headline loss to sweepers.
"""
import contextlib
import logging
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

import cli
from cli import ConfigError, validate  # noqa: F401  re-exported for tests, notebooks
from cli.build import Diverged, Refused, build, build_objective  # noqa: F401
from cli.job import GoodCheckpoint, run  # noqa: F401

log = logging.getLogger("onebit")


def parallel_jobs(hc) -> int:
    """How many of a sweep's jobs run at once: the joblib launcher's n_jobs (negative as joblib reads it: -1 is
    every core); submitit_local's: every job of the sweep (its preflight put their count in ONEBIT_SWEEP_JOBS);
    else 1 (the basic launcher runs them one after another)."""
    launcher = hc.launcher
    target = str(launcher.get("_target_", ""))
    if target.endswith("submitit_launcher.LocalLauncher"):
        return max(1, int(os.environ.get("ONEBIT_SWEEP_JOBS", "1")))
    if "joblib" not in target:
        return 1
    n_jobs = launcher.get("n_jobs") or 1
    if n_jobs < 0:
        from infer.runtime import available_cores

        n_jobs = max(1, available_cores() + 1 + n_jobs)
    return int(n_jobs)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    """Hydra task: run() into Hydra's output dir and record how it ended (status.json); log the summary; return the
    headline loss for sweepers (for a job that did not end well: nan, so no sweeper mistakes it for a result; None
    under optuna, which marks the trial failed: cli.failed_value)."""
    from hydra.core.hydra_config import HydraConfig

    from analysis.rundir import RunDirError

    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    from infer.runtime import oversubscription

    crowded = oversubscription(cfg.get("threads"), parallel_jobs(hc) if multirun else 1)
    if crowded:
        log.warning(crowded)
    out = Path(hc.runtime.output_dir)
    local_task = os.environ.get("SUBMITIT_EXECUTOR") == "local"  # submitit_local's, whose SIGTERM submitit ignores
    if multirun and (signal.getsignal(signal.SIGTERM) == signal.SIG_DFL or local_task):  # a worker: SIGTERM as SIGINT
        with contextlib.suppress(ValueError):  # not in the main thread: leave it
            signal.signal(signal.SIGTERM, cli.on_sigterm)
            cli.STATE["worker"] = True  # a SIGTERM sent to this worker alone ends its job, not the sweep
    if multirun and cli.sweep_stopping(hc.sweep.dir):  # a job handed out as the sweep stops: it does not start
        return cli.failed_value()
    requeue = cli.requeued(cfg, out) if multirun else ""
    try:
        claim = cli.claim_for(cfg, out, fresh=multirun)
    except RunDirError as err:
        repeat = cli.repeated_trial(out) if multirun else None
        if repeat is not None:  # optuna suggested a finished trial again: what its job returned
            return repeat[0]
        if multirun:  # recorded in the sweep dir, so the summary lists it
            cli.record_unclaimed(cfg, hc, err)
        return cli.fail(None, "refused", err, multirun)
    if multirun:
        cli.clear_unclaimed(cfg, hc)
    if requeue:
        log.info(requeue)
    try:
        if not multirun and cli.member_resumed_in_place(cfg, out):  # it stays its sweep's job, or group's replica
            cli.save_resume_overrides(claim, hc)
        else:
            cli.save_hydra_files(claim, cfg, hc)
        with cli.job.warnings_logged():
            metrics = run(cfg, out, multirun=multirun)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (cli.on_sigterm): the run says it was killed, then stops
        name = signal.Signals(cli.STATE["signal"] or signal.SIGINT).name
        reason = cli.killed_reason(name, out)
        with contextlib.suppress(OSError):
            if claim.moved:  # before training (fit's on_start commits): the run it was to replace goes back whole
                reason = f"killed by {name} before training (the run that was in {out} is kept as it was)"
                if multirun:
                    cli.refuse_replacing_job(claim, cfg, hc, reason)
                else:
                    claim.release()
                cli.STATE["kept_run"] = reason
            else:
                claim.status("failed", reason)
        if cli.STATE.get("worker") and name == "SIGTERM" and not cli.sweep_stopping(hc.sweep.dir):
            signal.signal(signal.SIGTERM, cli.on_sigterm)  # one job stopped (kill <pid>): the sweep's other jobs run
            cli.STATE["signal"] = None  # on, this worker takes more, and the summary lists this one
            log.error(f"job stopped by SIGTERM: {reason}")
            return cli.failed_value()
        raise
    except SystemExit as err:  # submitit stopped the job (its timeout or a preemption), and may requeue it
        job = cli.launcher_job()
        with contextlib.suppress(OSError):
            if job:
                claim.status("failed", cli.stopped_reason(err, out, cfg.get("replicas") or 1), stopped_by_launcher=job)
            else:
                claim.status("failed", f"exited (SystemExit {err.code}) before it finished")
        raise
    except Refused as err:
        if multirun and claim.moved:  # the earlier run this job would have replaced stays, labelled as it was
            cli.refuse_replacing_job(claim, cfg, hc, err)
            return cli.fail(None, "refused", err, multirun)
        return cli.fail(claim, "refused", err, multirun)
    except Diverged as err:
        return cli.fail(claim, "diverged", err, multirun)
    except Exception as err:  # noqa: BLE001  a crash, or an OSError: one line (before training, the run it replaces
        if not claim.moved:  # stays as it was: claim.moved holds that run's files until fit's on_start commits)
            return crashed(claim, out, err, multirun)
        reason = (f"crashed before training: {type(err).__name__}: {err} (the run that was in {out} is kept as it was;"
                  f" traceback in {traceback_outside(out)})")
        if multirun:
            cli.refuse_replacing_job(claim, cfg, hc, reason)
            claim = None
        return cli.fail(claim, "refused", reason, multirun, code=1)
    from analysis.report import summary_lines

    for line in (summary_lines(metrics) if "replicas" not in metrics else []):  # a replica group logged its own
        log.info(line)
    claim.status("ok", "finished", loss=metrics.get("loss"))
    log.info(f"outputs: {out}")
    loss = metrics.get("loss")
    return float(loss) if loss is not None else cli.failed_value()


def crashed(claim, out: Path, err: Exception, multirun: bool):
    """A run that crashed once training had begun: one line, status failed (a crash: its traceback in
    <out>/traceback.txt; an OSError: the outputs could not be written; submitit's stop for good: how to resume)."""
    if isinstance(err, OSError):
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return cli.fail(claim, "failed", f"cannot write the run's outputs in {out}: {err.strerror or err}{where}",
                        multirun)
    if type(err).__module__.startswith("submitit"):  # submitit stopped the job for good (no requeue left)
        resumes = " (its checkpoint.pt resumes it)" if (out / "checkpoint.pt").exists() else ""
        return cli.fail(claim, "failed", f"stopped by the launcher: {err}{resumes}", multirun)
    try:
        (out / "traceback.txt").write_text(traceback.format_exc())
    except OSError:
        pass
    return cli.fail(claim, "failed", f"crashed: {type(err).__name__}: {err} (traceback in {out}/traceback.txt)",
                    multirun, code=1)


def traceback_outside(out: Path) -> str:
    """Write the current exception's traceback into the system's temp folder (the run dir holds the run a crash left
    untouched); return the file's path."""
    try:
        fd, path = tempfile.mkstemp(prefix=f"onebit-{out.name[:100]}-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(traceback.format_exc())
        return path
    except OSError as err:
        return f"no file: {err.strerror or err}"


if __name__ == "__main__":
    sys.exit(cli.main(main, sys.argv))
