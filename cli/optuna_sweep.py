"""The optuna sweeper (`hydra/sweeper=optuna`, package hydra-optuna-sweeper) made to end as the other sweeps do.

Every job that does not end well returns None to optuna (cli.rundirs.failed_value), which marks its trial failed.
Left as it is, the sweeper then:
* logs "Return value must be float-castable. Got 'None'" for each such trial (the job has printed its own line);
* logs that a batch's failures exceed `hydra.sweeper.max_failure_rate` and goes on anyway (it stops only for a job
  that raised, and ours never do);
* ends with optuna's traceback "No trials are completed yet" when every trial failed;
* prints optuna's own INFO lines (ANSI-coloured) and alembic's plugin set-up lines.

prepare() (run by the preflight of an optuna sweep) changes that:
* the sweep stops before its next batch when a batch's failures exceed max_failure_rate (optuna's default 0.0:
  the first failed trial), with one line on why (STATE['sweep_stopped']); the launcher's results decide, not the
  sweeper's log lines;
* a sweep whose every trial failed ends without a best value: optimization_results.yaml says so;
* a search space or setting optuna refuses before any trial (`interval(1,0)`, a storage URL it cannot open) is one
  line, exit 2, and the sweep dir goes (STATE['sweep_refused']);
* either way the sweep summary is written, each failed job gets its `failed:` line, and the exit code is 1;
* optuna's own lines below warnings are silent.

repeated_trial() returns, for a trial optuna suggests again (the same overrides, so the same job dir), what the job
of this sweep in that dir returned: the same config and seed give the same numbers, so it is not trained again.
"""
import logging
import sys
from pathlib import Path

from cli.keys import single_line
from cli.state import STATE

log = logging.getLogger("onebit")
SWEEPER_LOG = "hydra_plugins.hydra_optuna_sweeper._impl"  # the sweeper's logger (logging.getLogger(__name__))


class StopSweep(Exception):
    """A batch of trials failed more often than hydra.sweeper.max_failure_rate allows."""


class FailedTrialLines(logging.Filter):
    """On the sweeper's logger: drops its lines about our failed jobs (each job printed why it failed, and
    ending_sweep says why the sweep stops): "Return value must be float-castable. Got 'None'", and the count of a
    batch's failures against max_failure_rate, which the sweeper logs and then ignores for jobs that return None."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Return value must be float-castable. Got 'None'" in text
                    or text.startswith("Failed ") and "with max_failure_rate=" in text)


def quiet_optuna() -> None:
    """optuna's own log lines below warnings off, and its warnings through the root logger (the run's format), not
    its ANSI-coloured handler."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _results(sweeper, best, note: str) -> None:
    """optimization_results.yaml for a sweep that ended without optuna's own (the folder then holds a sweep, as after
    any optuna sweep: cli.sweep.holds_sweep): best = (value, the job's overrides) of the best completed trial, or
    None, and a note on why."""
    from omegaconf import OmegaConf

    path = Path(str(sweeper.config.hydra.sweep.dir)) / "optimization_results.yaml"
    value, overrides = best if best is not None else (None, None)
    OmegaConf.save(OmegaConf.create({"name": "optuna", "best_overrides": overrides, "best_value": value,
                                     "note": note}), path)


def prepare() -> None:
    """Install the above for this process's optuna sweep: quiet logs, the filter, and the sweeper's sweep() wrapped
    so that a batch above max_failure_rate (StopSweep) and the missing best trial of a sweep whose every trial
    failed end the sweep normally (the summary is written by the multirun's end callback; cli.main prints the failed
    jobs and the reason, and exits 1). A no-op where hydra-optuna-sweeper is not installed."""
    try:
        from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
    except ImportError:
        return
    quiet_optuna()
    sweeper_log = logging.getLogger(SWEEPER_LOG)
    if not any(isinstance(f, FailedTrialLines) for f in sweeper_log.filters):
        sweeper_log.addFilter(FailedTrialLines())
    sweep = getattr(OptunaSweeperImpl.sweep, "original", OptunaSweeperImpl.sweep)

    def ending_sweep(self, arguments):
        from hydra.core.utils import JobStatus

        batches, launch = [], self.launcher.launch  # per launched batch: (failed trials, trials)
        completed = []  # (value, overrides) of every trial that returned a value

        def launching(*args, **kwargs):  # a batch above max_failure_rate stops the sweep before the next one
            if batches and batches[-1][0] > self.max_failure_rate * batches[-1][1]:
                failed, count = batches[-1]
                raise StopSweep(f"{failed} of the {count} trials of its last batch failed, more than "
                                f"hydra.sweeper.max_failure_rate={self.max_failure_rate} allows (0.0, optuna's "
                                "default, stops at the first failed trial; 1.0 goes on past failed trials)")
            returns = launch(*args, **kwargs)
            done = [r for r in returns if r.status == JobStatus.COMPLETED and r._return_value is not None]
            completed.extend((float(r._return_value), list(r.overrides)) for r in done)
            batches.append((len(returns) - len(done), len(returns)))
            return returns

        self.launcher.launch = launching
        try:
            return sweep(self, arguments)
        except StopSweep as stop:
            STATE["sweep_stopped"] = f"the optuna sweep stopped early: {stop}"
            pick = max if "maximize" in str(self.direction) else min
            _results(self, pick(completed, key=lambda c: c[0]) if completed else None,
                     "the sweep stopped early (hydra.sweeper.max_failure_rate): the best of the trials that completed"
                     if completed else "the sweep stopped early (hydra.sweeper.max_failure_rate): no trial completed")
        except Exception as err:  # noqa: BLE001  sorted below; anything else is raised again
            if not batches:  # before any trial: its search space (interval(1,0)) or a setting (a storage URL)
                why = single_line(err) or f"{type(err).__name__}, with no message"
                if self.storage and not single_line(err):  # optuna 2.x's database storage fails so on SQLAlchemy 2
                    why += (f", opening hydra.sweeper.storage={self.storage!r} (optuna 2's database storage needs "
                            "SQLAlchemy < 2; null keeps the study in memory)")
                STATE["sweep_refused"] = f"the optuna sweeper refused the sweep before any trial: {why}"
                return
            if not isinstance(err, ValueError) or completed:
                raise  # optuna's best trial cannot be found only where no trial completed
            STATE["sweep_stopped"] = "the optuna sweep has no best value: every trial failed"
            _results(self, None, "every trial failed: no best value")
        finally:
            self.launcher.launch = launch
        log.error(STATE["sweep_stopped"])

    ending_sweep.original = sweep
    OptunaSweeperImpl.sweep = ending_sweep


def repeated_trial(out: Path):
    """For a trial that repeats a finished job of this optuna sweep (its job dir `out` holds a run that ended): what
    that job returned, as a 1-tuple (its loss where it ended ok, else None: the trial fails again); None where this
    is no such trial (not optuna, or no run that ended there). The repeat's overrides, and so its config, are that
    job's: the job dir's name is made of them (hydra.job.override_dirname, less keys that change no number), and the
    sweep dir holds only this sweep's jobs (a folder holding an earlier sweep is refused: cli.sweep.holds_sweep)."""
    from analysis.rundir import read_status
    from cli.rundirs import failed_value, is_sweep_job

    if failed_value() is not None or not is_sweep_job(out):  # not optuna, or a lone run's dir, not a sweep job's
        return None
    status = read_status(out)
    ended, loss = status.get("status"), status.get("loss")
    if ended in (None, "running"):
        return None
    if ended == "ok" and isinstance(loss, (int, float)):
        print(f"this trial repeats the finished job in {out} (the same overrides): its loss {loss} is reused, not "
              "retrained")  # printed, not logged: the job's log file would be that run's run.log
        return (float(loss),)
    print(f"error: this trial repeats the job in {out} (the same overrides), which ended {ended!r}: it fails again, "
          "not retrained", file=sys.stderr)
    return (None,)
