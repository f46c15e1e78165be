"""Interruption: SIGINT or SIGTERM ends a run, or a sweep and its workers, with every unfinished run's status.json
saying 'killed by <signal>', and the process exits 128 + the signal.
"""
import os
import signal
import sys
from pathlib import Path

from analysis.rundir import pid_alive as _alive
from analysis.rundir import run_path
from cli.state import STATE


STOPPING = ".sweep.stopping"  # in a sweep dir while its process stops its workers: their SIGTERM ends the sweep


def sweep_stopping(sweep_dir) -> bool:
    """Whether the sweep in sweep_dir is stopping (its process marked it before it signalled its workers): a worker's
    SIGTERM is then the sweep's end, not one job's."""
    return sweep_dir is not None and (Path(sweep_dir) / STOPPING).exists()


def _mark_stopping() -> None:
    """Mark this process's sweep as stopping, before its workers are signalled (not in a worker)."""
    if STATE.get("sweep_dir") is not None and not STATE.get("worker"):
        with __import__("contextlib").suppress(OSError):
            (Path(STATE["sweep_dir"]) / STOPPING).touch()


def on_sigterm(signum, frame):
    """SIGTERM takes SIGINT's path: KeyboardInterrupt in the main thread, so a run records that it was killed and a
    sweep writes its summary at exit. A second SIGTERM ends the process at once."""
    STATE["signal"] = signum
    signal.signal(signum, signal.SIG_DFL)  # SIGTERM (or a submitit_local sweep's SIGHUP: cli.checks)
    _mark_stopping()
    tasks = _end_controllers(signum)  # signalled already, and in STATE["workers"]
    STATE["workers"] = sorted(set(STATE.get("workers") or []) | set(_children()))
    for pid in [p for p in STATE["workers"] if p not in tasks]:  # a sweep's workers (joblib) stop too, and record it
        with __import__("contextlib").suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def process_tree() -> dict:
    """{pid: (parent pid, command line bytes)} of this machine's processes (Linux /proc; {} elsewhere)."""
    tree = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            tree[int(stat.parent.name)] = (ppid, (stat.parent / "cmdline").read_bytes())
        except (OSError, IndexError, ValueError):
            continue
    return tree


def descendants(root: int, tree: dict) -> list:
    """The pids below root in tree (process_tree), nearest first."""
    out, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in tree.items() if ppid in frontier and pid not in out}
        out += sorted(frontier)
    return out


def _children() -> list:
    """The pids of this process's worker processes: its descendants (Linux /proc; [] elsewhere: joblib's workers are
    its children, submitit_local's jobs their children), less the resource trackers of multiprocessing and loky
    (they end by themselves when this process does)."""
    tree = process_tree()
    return [pid for pid in descendants(os.getpid(), tree) if b"resource_tracker" not in tree[pid][1]]


def _end_controllers(signum: int) -> list:
    """submitit_local's controllers ended quietly, their tasks sent signum (cli.submitit_launch); the tasks' pids,
    kept in STATE['workers'] (no longer this process's descendants). [] outside a sweep's main process."""
    if STATE.get("worker") or "submitit" not in str(STATE.get("launcher")):
        return []
    from cli.submitit_launch import end_controllers

    tasks = end_controllers(signum)
    STATE["workers"] = sorted(set(STATE.get("workers") or []) | set(tasks))
    STATE["signalled"] = sorted(set(STATE.get("signalled") or []) | set(tasks))  # stop_workers does not again
    return tasks


def on_sigint(signum, frame):
    """SIGINT in a sweep's main process: as Python's default (KeyboardInterrupt in the main thread), after ending
    submitit_local's controllers without their tracebacks (_end_controllers)."""
    STATE["signal"] = signum
    _end_controllers(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_workers(grace: float = 10.0) -> list:
    """End the sweep's worker processes (joblib's workers, submitit_local's jobs and their controllers): SIGTERM each
    (a joblib worker's run records that it was killed; submitit's jobs ignore it), wait up to `grace` seconds, then
    SIGKILL those left (mark_killed records their runs). Returns their pids."""
    import time

    _mark_stopping()
    pids = list(dict.fromkeys(_children() + [p for p in STATE.get("workers") or [] if _alive(p)]))  # submitit's tasks
    for pid in [p for p in pids if p not in (STATE.get("signalled") or [])]:  # a second signal would cut one short
        with __import__("contextlib").suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with __import__("contextlib").suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 3.0  # SIGKILL lands asynchronously: mark_killed judges them gone
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:  # reap them (our children among them)
        with __import__("contextlib").suppress(OSError):
            os.waitpid(pid, os.WNOHANG)
    return pids


def mark_killed(sweep_dir: Path, pids, name: str) -> int:
    """Every run of this sweep (status.json 'running', written by this process, one of its workers `pids`, or any
    process of this host since this launch began: joblib ends its workers on SIGINT before they can be listed)
    whose process is gone, or is this one, gets status failed: 'killed by <name>'. Returns how many."""
    import socket

    from analysis.jobs import of_this_launch
    from analysis.rundir import read_status, write_status

    host, count = socket.gethostname(), 0
    for path in sorted(Path(sweep_dir).rglob("status.json")):
        status = read_status(path.parent)
        pid = status.get("pid")
        ours = pid == os.getpid() or pid in pids or (  # or a worker joblib ended before we could list it
            of_this_launch(status, Path(sweep_dir), unknown=False) and status.get("host", host) == host)
        if status.get("status") != "running" or not ours or (pid != os.getpid() and _alive(pid)):
            continue
        write_status(path.parent, "failed", killed_reason(name, path.parent))
        count += 1
    return count


def killed_reason(name: str, out) -> str:
    """status.json's reason for a run ended by a signal."""
    resumes = " (its checkpoint.pt resumes it)" if (Path(out) / "checkpoint.pt").exists() else ""
    return f"killed by {name} before it finished{resumes}"


def interrupted(multirun: bool, started: bool = True) -> int:
    """After SIGINT or SIGTERM: stop the sweep's workers, mark its unfinished runs killed, say so in one line;
    the sweep summary is written at exit (analysis.callbacks.SweepSummary). A single run interrupted before its task
    began (in the preflight, or in Hydra's start-up), and a sweep before any job of it began (started=False, or no
    status.json of this launch, where no job waits in a SLURM queue), give back what was claimed for them. Returns
    128 + the signal."""
    from cli.rundirs import release_unstarted

    signum = STATE["signal"] or signal.SIGINT
    name = signal.Signals(signum).name
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # let the summary be written
        signal.signal(stop, signal.SIG_IGN)
    where = ""
    pids = set(stop_workers()) | set(STATE.get("workers") or []) if multirun and started else set()
    queued = "Slurm" in str(STATE.get("launcher"))  # its jobs wait in SLURM's queue, out of reach: they may begin
    if multirun and (not started or not queued and not _jobs_begun(STATE.get("sweep_dir"))):
        undo = STATE.pop("sweep_undo", None)
        if undo is not None:  # the sweep's lock, and the folders it made while they are empty
            undo()
        where = " before any job of the sweep began (no job ran)"
    elif not multirun and (kept := release_unstarted()):
        where = f" before the run began ({kept})"
    elif multirun:
        sweep_dir = STATE["sweep_dir"]
        mark_killed(sweep_dir, pids, name)
        where = (f"; its unfinished runs say 'killed by {name}' in status.json; the sweep summary is written to "
                 f"{sweep_dir}/summary.md")
    elif STATE.get("kept_run"):
        where = f" {STATE['kept_run'].partition(' by ' + name + ' ')[2]}"
    elif STATE.get("claim") is not None:
        where = f"; outputs so far in {STATE['claim'].path}{STATE['claim'].kept_note()}"  # overwrite=true
    if multirun and STATE.get("sweep_dir") is not None:  # its workers are gone: a relaunch starts unmarked
        with __import__("contextlib").suppress(OSError):
            (Path(STATE["sweep_dir"]) / STOPPING).unlink(missing_ok=True)
    print(f"error: interrupted by {name}{where}", file=sys.stderr)
    return 128 + int(signum)


def _jobs_begun(sweep_dir) -> bool:
    """Whether a job of the sweep launched into sweep_dir has begun: a status.json of this launch below it."""
    from analysis.jobs import of_this_launch
    from analysis.rundir import read_status

    if sweep_dir is None:
        return True
    return any(of_this_launch(read_status(p.parent), Path(sweep_dir), unknown=False)
               for p in Path(sweep_dir).rglob("status.json"))


def launcher_job() -> str:
    """The id of the submitit job this process runs ('' outside submitit), as submitit's JobEnvironment reads it
    from the environment: the same for a job and its requeued copies (submitit's local executor and SLURM keep it
    across a requeue), so a requeue is told from a new launch by it."""
    env = os.environ
    executor = env.get("SUBMITIT_EXECUTOR", "")
    if executor == "local":
        return env.get("SUBMITIT_LOCAL_JOB_ID", "")
    if executor == "slurm":
        if env.get("SLURM_ARRAY_JOB_ID"):
            return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
        return env.get("SLURM_JOB_ID", "")
    return ""


def stopped_reason(err: SystemExit, out, replicas: int = 1) -> str:
    """status.json's reason for a sweep job its launcher stopped (SystemExit inside a submitit job: its timeout or a
    preemption, after which submitit requeues it while requeues are left: hydra.launcher.max_num_timeout)."""
    if replicas > 1:
        then = "a requeued job trains the replicas again (a replica group does not resume)"
    elif (Path(out) / "checkpoint.pt").exists():
        then = "a requeued job resumes from checkpoint.pt"
    else:
        then = "a requeued job starts it again (no checkpoint.pt yet)"
    return f"stopped by the launcher (exit {err.code}: its timeout or a preemption); {then}"


def requeued(cfg, out) -> str:
    """Ready a sweep job that its launcher runs again: one it requeued after stopping it (status.json 'failed' with
    stopped_by_launcher naming this submitit job, launcher_job), or one of this launch lost with its joblib worker
    (lost_job) that cli.joblib_launch relaunches. It resumes in place from its checkpoint.pt (train.resume set,
    whatever the command line gave), or, with none written yet, replaces the attempt (overwrite). Returns the note
    to log, or '' for any other job (left as it is)."""
    from omegaconf import open_dict

    from analysis.rundir import read_status

    job = launcher_job()
    status = read_status(out)
    if job and status.get("status") == "failed" and status.get("stopped_by_launcher") == job:
        who = f"requeued by the launcher (job {job})"
    elif lost_job(out):
        who = "relaunched after its joblib worker was lost"
    else:
        return ""
    checkpoint = run_path(out) / "checkpoint.pt"
    with open_dict(cfg):
        if checkpoint.is_file() and not (cfg.get("replicas") or 1) > 1:
            cfg.train.resume, cfg.overwrite = str(checkpoint), False
            return f"{who}: resuming from {checkpoint}"
        cfg.overwrite = True
    return f"{who}: starting again"


def lost_job(out) -> bool:
    """Whether `out` holds a job of the running sweep launch (status.json 'launch', cli.rundirs._launch) that was
    lost: still said to be running, by a process that is gone (a joblib worker killed with its pool). Only the
    launcher runs a job number again within its launch, so such a job is its own rerun."""
    from analysis.rundir import live_owner, read_status
    from cli.rundirs import _launch

    status, launch = read_status(out), _launch()
    return (bool(launch) and status.get("status") == "running" and status.get("launch") == launch
            and live_owner(out) is None)
