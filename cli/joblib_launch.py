"""Hydra's joblib launcher, made to outlive a lost worker (launch() follows hydra-joblib-launcher 1.2's
_core.launch line by line, but for the relaunch: compare it there on an upgrade of the plugin).

A joblib worker killed from outside (SIGKILL, the out-of-memory killer) makes loky end every worker of the pool and
joblib raise TerminatedWorkerError: Hydra's launcher then ends the whole sweep with a traceback, and the jobs not
started yet never run. Here (installed by cli.checks.preflight under hydra/launcher=joblib) the sweep goes on: the
jobs of the batch that ended keep their results (read back from their job dirs' status.json), the ones that were
running when the pool died are lost, the jobs not started yet are launched again, in a new pool, with their own
job numbers, and then each lost job runs again, alone in a pool of its own, so that the job whose worker died cannot
take it down a second time: it resumes from its checkpoint.pt, or starts again where it wrote none
(cli.signals.requeued). A job that loses its worker again, alone, stays lost: its status.json says running, and the
sweep summary lists it as killed. The launch itself is Hydra's (hydra_joblib_launcher._core.launch: execute_job
per job, loky), so a sweep that loses no worker runs exactly as before.
"""
import logging
import math
import re
from pathlib import Path

log = logging.getLogger(__name__)
ENDED = ("ok", "diverged", "failed", "refused")


def install(value=math.nan) -> None:
    """Make JoblibLauncher.launch this module's launch; lost jobs return `value` (cli.rundirs.failed_value). A
    no-op without the joblib launcher plugin."""
    try:
        from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
    except ImportError:
        return

    def patched(self, job_overrides, initial_job_idx):
        return launch(self, job_overrides, initial_job_idx, value)

    JoblibLauncher.launch = patched


def launch(launcher, job_overrides, initial_job_idx: int, value=math.nan) -> list:
    """Hydra's joblib launch of job_overrides (numbered from initial_job_idx) that relaunches, after a lost worker,
    the jobs that had not started; returns one JobReturn per job, in order."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, filter_overrides, setup_globals
    from hydra_plugins.hydra_joblib_launcher._core import execute_job, process_joblib_cfg
    from joblib import Parallel, delayed
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    joblib_cfg = launcher.joblib
    joblib_cfg["backend"] = "loky"  # as Hydra's launcher: its threading backend is incompatible with Hydra
    process_joblib_cfg(joblib_cfg)
    log.info("Joblib.Parallel({}) is launching {} jobs".format(",".join(f"{k}={v}" for k, v in joblib_cfg.items()),
                                                               len(job_overrides)))
    log.info(f"Launching jobs, sweep output dir : {sweep_dir}")
    for idx, overrides in enumerate(job_overrides):
        log.info("\t#{} : {}".format(idx, " ".join(filter_overrides(overrides))))
    singleton_state = Singleton.get_state()

    def run(jobs: dict) -> list:
        return Parallel(**joblib_cfg)(delayed(execute_job)(idx, overrides, launcher.hydra_context, launcher.config,
                                                           launcher.task_function, singleton_state)
                                      for idx, overrides in jobs.items())

    todo = {initial_job_idx + i: list(o) for i, o in enumerate(job_overrides)}
    done, again = {}, {}
    while todo:
        try:
            done.update(zip(todo, run(todo)))
            todo = {}
        except TerminatedWorkerError as err:
            before, lost = len(todo), []
            for idx, overrides in list(todo.items()):
                state, result = job_state(launcher.config, overrides, idx, value)
                if state == "unstarted":
                    continue
                del todo[idx]
                if state == "lost":
                    again[idx] = overrides
                    lost.append(idx)
                else:
                    done[idx] = result
            if len(todo) == before:  # no job started or ended: a new pool would die the same way
                raise
            log.warning(f"a joblib worker died ({_why(err)}); joblib ends every worker then: the jobs that were "
                        f"running ({', '.join(f'#{i - initial_job_idx}' for i in lost) or 'none'}) are lost, and "
                        f"run again, one at a time, once the {len(todo)} not started yet have run")
    for idx, overrides in again.items():  # alone in its pool: a job lost beside the one whose worker died now ends
        try:
            done[idx] = run({idx: overrides})[0]
        except TerminatedWorkerError as err:
            state, result = job_state(launcher.config, overrides, idx, value)  # its first try's status at least
            done[idx] = result
            if state == "lost":
                log.warning(f"job #{idx - initial_job_idx} lost its worker again, alone ({_why(err)}): its "
                            "status.json says running, the summary lists it as killed, and its checkpoint.pt (where "
                            "it wrote one) resumes it")
    return [done[initial_job_idx + i] for i in range(len(job_overrides))]


def _why(err) -> str:
    """loky's exit codes of the dead workers, from its TerminatedWorkerError."""
    codes = re.search(r"exit codes of the workers are (\{[^}]*\})", str(err))
    return f"exit codes {codes.group(1)}" if codes else type(err).__name__


def job_state(config, overrides, idx: int, value) -> tuple:
    """('ended' | 'lost' | 'unstarted', JobReturn or None) of job number idx after its pool died, from its job
    dir's status.json (an ended job: its loss, or `value` where it did not end well; a job still said to be
    running: lost) or a refusal recorded for it (cli.rundirs.record_unclaimed); a status.json an earlier launch
    left (analysis.jobs.of_this_launch) is no sign of this one's job: unstarted."""
    from hydra.core.utils import JobReturn, JobStatus

    from analysis.jobs import of_this_launch
    from analysis.rundir import read_status
    from cli.sweep import job_subdir

    sweep_dir = Path(str(config.hydra.sweep.dir))
    folder = sweep_dir / job_subdir(overrides, idx, config)
    status = read_status(folder) if folder.is_dir() else {}
    status = status if status and of_this_launch(status, sweep_dir) else {}  # not an earlier launch's
    record = read_status(sweep_dir / "_refused" / f"job{idx}")
    refused = bool(record) and of_this_launch(record, sweep_dir)
    if not status and not refused:
        return "unstarted", None
    ended = status.get("status") in ENDED or refused
    loss = status.get("loss") if status.get("status") == "ok" else None
    result = JobReturn(overrides=list(overrides), working_dir=str(folder), status=JobStatus.COMPLETED,
                       _return_value=float(loss) if loss is not None else value)
    return ("ended" if ended else "lost"), result
