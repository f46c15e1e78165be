"""Hydra callbacks. Imported when Hydra builds its callbacks, so this module imports nothing heavy at import time.

Register in conf/config.yaml:

    hydra:
      callbacks:
        sweep_summary:
          _target_: analysis.callbacks.SweepSummary
"""
import atexit
import contextlib
import logging
import signal
import threading
from pathlib import Path

from hydra.experimental.callback import Callback

from .rundir import run_path

log = logging.getLogger("onebit.sweep")
LAST = {}  # the last sweep's outcome in this process: {"failed": [(job, reason), ...]}; run.py's exit code reads it


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM while the body runs, in the main thread: a signal that arrives is recorded, and raised
    again when the body ends, so its own handler runs then. Elsewhere (another thread) the body just runs.

    Held at Python's level, not by pthread_sigmask: a process-directed signal goes to any thread that does not block
    it (torch's and joblib's threads), and Python then runs the handler in the main thread at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    before = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
              for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


class SweepSummary(Callback):
    """Writes summary.csv, summary.md and the sweep figures (analysis.sweep.summarize) into the sweep directory
    when a multirun ends. If a job raised, Hydra's sweeper stops before on_multirun_end; the summary is then
    written at interpreter exit instead (by `python -m analysis.sweep` in a subprocess, since an exiting
    interpreter cannot import the plotting stack), listing the failed jobs."""

    def __init__(self, figures: bool = True):
        self.figures = figures
        self.sweep_dir = None
        self.done = False

    def on_multirun_start(self, config, **kwargs) -> None:
        self.sweep_dir = run_path(str(config.hydra.sweep.dir))
        self.done = False
        atexit.register(self._at_exit)

    def on_multirun_end(self, config, **kwargs) -> None:
        self._summarize(self.sweep_dir or run_path(str(config.hydra.sweep.dir)), ended=True)

    def _at_exit(self) -> None:
        if self.done or self.sweep_dir is None or not self.sweep_dir.is_dir():
            return
        self.done = True
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "analysis.sweep", "--", str(self.sweep_dir)], capture_output=True,
                              text=True)
        if proc.returncode == 0:
            log.info("sweep summary (after a failed job) in %s", self.sweep_dir / "summary.md")
        elif "holds no sweep" in proc.stderr:  # no job of it ran (the sweeper failed first): nothing to summarise
            log.info("no job of the sweep in %s ran: no summary", self.sweep_dir)
        else:
            log.error("sweep summary of %s failed: %s", self.sweep_dir, proc.stderr.strip().splitlines()[-1:])

    def _summarize(self, sweep_dir: Path, ended: bool = False) -> None:
        with signals_held():  # a SIGINT/SIGTERM arriving meanwhile is delivered once the summary is written
            self._write_summary(sweep_dir, ended)
            self.done = True

    def _write_summary(self, sweep_dir: Path, ended: bool = False) -> None:
        from analysis.sweep import NotASweep, summarize

        try:
            result = summarize(sweep_dir, figures=self.figures, ended=ended)
            jobs = result["jobs"]
            bad = jobs[jobs["status"] != "ok"]
            LAST["failed"] = [(r["job"], f"{r['status']}: {r.get('error') or ''}") for _, r in bad.iterrows()]
            LAST["failed"] += [(m, "missing: no job directory") for m in result["missing"]]
            log.info("sweep summary: %d jobs, %d runs (%d failed, %d missing, %d job dirs of other launches left "
                     "out) in %s", len(result["launched"]), len(result["jobs"]), len(result["failed"]),
                     len(result["missing"]), len(result["left_out"]), sweep_dir / "summary.md")
        except NotASweep:  # no job of it ran (e.g. its sweeper refused it first): nothing to summarise
            LAST["failed"] = []
        except Exception as err:  # the sweep's own results stay on disk; say why the summary is absent
            log.error("sweep summary of %s failed: %s: %s", sweep_dir, type(err).__name__, err)
            LAST["failed"] = [(str(sweep_dir), f"the sweep summary failed: {type(err).__name__}: {err}")]
