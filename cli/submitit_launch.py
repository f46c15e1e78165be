"""submitit_local under SIGINT: quiet, and with every run recording that it was killed.

Unpatched, a Ctrl-C reaches submitit_local's job controllers (`python -m submitit.local._local`, one per job) through
the terminal, and submitit's cancel sends them SIGINT again as Hydra's launcher unwinds: each prints a
KeyboardInterrupt traceback onto the sweep's console. Here:
- `install` starts each controller in a session of its own (start_new_session), so the terminal's SIGINT reaches
  only the sweep's main process;
- `end_controllers` (cli.signals, on the main process's SIGINT or SIGTERM) does what a controller's cancel would do,
  without its traceback: its tasks (the runs) get the signal the sweep got, so each records 'killed by SIGINT' (or
  SIGTERM: run.py lets a submitit_local task honour it, which submitit's own handler ignores) in its status.json, and
  the controller itself SIGKILL (it holds no state of its own: submitit's pickles and logs are written).

Only the main process of a sweep under hydra/launcher=submitit_local is touched; SLURM's jobs are SLURM's.
"""
import functools
import os
import signal
import subprocess
import types

CONTROLLER = b"submitit.local._local"  # in a controller's command line


def install() -> None:
    """Start submitit_local's job controllers in sessions of their own (idempotent; a no-op without submitit)."""
    try:
        from submitit.local import local
    except ImportError:
        return
    if getattr(local.subprocess, "own_session", False):
        return
    shim = types.ModuleType("subprocess")  # submitit.local.local's `subprocess`: Popen starts a new session
    shim.__dict__.update(vars(subprocess))
    shim.Popen = functools.partial(subprocess.Popen, start_new_session=True)
    shim.own_session = True
    local.subprocess = shim


def end_controllers(signum: int = signal.SIGINT) -> list:
    """Send signum to every task of this process's submitit_local controllers, then SIGKILL the controllers (reaped, so
    that submitit's own cancel finds them ended and signals nothing). Returns the tasks' pids: once their
    controller is gone they are no longer this process's descendants, and the caller keeps them as the sweep's
    workers (STATE['workers']). [] where no controller runs."""
    from cli.signals import descendants, process_tree

    tree = process_tree()
    controllers = [pid for pid in descendants(os.getpid(), tree) if CONTROLLER in tree[pid][1]]
    tasks = [pid for c in controllers for pid in descendants(c, tree)]
    for pid in tasks:
        with __import__("contextlib").suppress(OSError):
            os.kill(pid, signum)
    for pid in controllers:
        with __import__("contextlib").suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in controllers:
        with __import__("contextlib").suppress(OSError, ChildProcessError):
            os.waitpid(pid, 0)
    return tasks
