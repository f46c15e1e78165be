"""The run directories: each run (or sweep job, or replica) claims its own directory, records its .hydra files,
and records how it ended in status.json (fail); a sweep job that cannot claim its directory is recorded apart.
"""
import contextlib
import fcntl
import json
import logging
import math
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from analysis.aggregate import NO_RESULT_KEYS
from cli.keys import single_line
from cli.state import STATE

log = logging.getLogger("onebit")


def unclaimed_record(hc) -> Path:
    """Where a sweep job that could not claim its own directory is recorded."""
    from analysis.rundir import run_path

    return run_path(str(hc.sweep.dir)) / "_refused" / f"job{hc.job.num}"


def clear_unclaimed(cfg, hc) -> None:
    """A sweep job that claimed its directory, re-run with overwrite=true: an earlier launch's record that this job
    could not claim it goes (the summary would list the job twice)."""
    import shutil

    from analysis.rundir import read_status

    record = unclaimed_record(hc)
    if cfg.get("overwrite", False) and read_status(record).get("status") == "refused":
        shutil.rmtree(record, ignore_errors=True)
        try:
            record.parent.rmdir()  # only if no other record is left
        except OSError:
            pass


def record_unclaimed(cfg, hc, err, reason: str = None) -> None:
    """A sweep job whose own directory could not be claimed (it holds another run, or cannot be written) is
    recorded in <sweep dir>/_refused/job<num>/ (its .hydra files and status.json = refused, with the reason), so
    that the sweep summary lists it; nothing is written into the directory it could not claim."""
    from analysis.claim import Claim
    from analysis.rundir import RunDirError

    try:
        claim = Claim(unclaimed_record(hc), allow_existing=bool(cfg.get("overwrite", False)), launch=_launch(),
                      job=_job())
        save_hydra_files(claim, cfg, hc)
        claim.status("refused", reason or f"its job dir could not be claimed: {single_line(err)}")
    except (RunDirError, OSError):
        pass  # the sweep dir itself cannot be written: the line on stderr is all there is


def refuse_replacing_job(claim, cfg, hc, err) -> None:
    """A sweep job refused before training (overwrite=true) in a directory whose earlier run its claim had moved
    aside: that run goes back whole, its status.json too, so its numbers keep their own label; the refusal is
    recorded apart, in <sweep dir>/_refused/job<num>/ (record_unclaimed), where the sweep summary lists it."""
    claim.release()
    record_unclaimed(cfg, hc, err, reason=f"{single_line(err)} (refused before training; the earlier run in "
                                          f"{claim.path} is kept as it was)")


def claim_for(cfg, out: Path, fresh: bool = False):
    """The Claim on `out` for this run: the one preflight made for a single run, or a new one (a sweep job: fresh,
    so that a job never takes over an earlier job's claim on the same dir; a run without the CLI).
    A directory holding a run is refused unless overwrite=true or the run resumes a checkpoint inside it, and one
    whose run is still running in another process (live_owner) is refused always (RunDirError)."""
    from analysis.claim import Claim

    from analysis.rundir import RunDirError, live_owner, run_path

    held, out = STATE.get("claim"), run_path(out)
    if not fresh and held is not None and Path(held.path) == out:
        return held

    with _locked(out):  # of two runs claiming one existing dir at once, the second sees the first's status
        pid = live_owner(out)
        if pid is not None:  # overwrite=true or an in-place resume would write beside a run that is still training
            key = "hydra.sweep.dir" if fresh else "hydra.run.dir"
            raise RunDirError(f"output dir {out} is in use: the run there is still running (pid "
                              f"{pid}); wait for it to end, or choose another {key}")
        in_place = resumes_in_place(cfg, out)
        overwrite = bool(cfg.get("overwrite", False))
        if in_place:
            check_in_place_resume(cfg, out, overwrite)
        claim = Claim(out, allow_existing=overwrite or in_place, replace=overwrite and not in_place,
                      key="hydra.sweep.dir" if fresh else "hydra.run.dir", launch=_launch() if fresh else "",
                      job=_job() if fresh else "")
    STATE["claim"] = claim
    return claim


def _job() -> str:
    """The launcher's id of this job (submitit's, cli.signals.launcher_job); '' under another launcher."""
    from cli.signals import launcher_job

    return launcher_job()


def _launch() -> str:
    """The running sweep's launch id (analysis.jobs.launch_of of its sweep dir); '' outside a Hydra multirun."""
    from analysis.jobs import launch_of

    try:
        from hydra.core.hydra_config import HydraConfig

        return launch_of(Path(str(HydraConfig.get().sweep.dir)))
    except ValueError:  # no Hydra app
        return ""


@contextlib.contextmanager
def _locked(out):
    """An exclusive flock, while `out` is claimed, on `out` or, where it does not exist yet, on its nearest existing
    parent: two claims of one dir, new or not, take turns, and the second sees the first's status.json."""
    from analysis.rundir import run_path

    folder = run_path(out)
    try:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # a name too long, a file in the way: the Claim refuses it in one line
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


IN_PLACE_FREE = ("train.resume", "threads", *NO_RESULT_KEYS)  # change no number


def check_in_place_resume(cfg, out, overwrite: bool = False) -> None:
    """Refuse (RunDirError, one line) a resume into the directory of its own checkpoint that would replace a finished
    run's results (status ok; overwrite=true allows it), or that would change the config of the sweep job or replica
    there (whatever overwrite says: its .hydra files stay its own, member_resumed_in_place, and its sweep's or
    group's summary reports it under them)."""
    from analysis.rundir import RunDirError, read_status, run_path
    from analysis.describe import dotted

    out = run_path(out)
    if not overwrite and read_status(out).get("status") == "ok":
        raise RunDirError(f"output dir {out} holds a finished run (status ok): resuming it in place would replace its "
                          "results; resume it into another dir (hydra.run.dir), or set overwrite=true to replace them")
    member = member_resumed_in_place(cfg, out)
    if not member:
        return
    try:
        saved = dotted(OmegaConf.to_container(OmegaConf.load(out / ".hydra" / "config.yaml")))
    except Exception:  # noqa: BLE001  unreadable: the resume's own checks (checkpoint vs config) still run
        return
    now = dotted({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"})
    changed = [k for k in sorted(set(saved) | set(now)) if k not in IN_PLACE_FREE and saved.get(k) != now.get(k)]
    if changed:
        key, whose = changed[0], MEMBERS[member]
        raise RunDirError(f"{key}={now.get(key)!r} is not allowed in place: the {member} in {out} ran with "
                          f"{key}={saved.get(key)!r}, and its {whose} summary reports it under its own config; resume "
                          "it with its config, or into another dir (hydra.run.dir), where it is a run of its own")


def resumes_in_place(cfg, out) -> bool:
    """Whether this run resumes a checkpoint inside its own run dir `out` (train.resume=<out>/checkpoint.pt)."""
    from analysis.rundir import run_path

    resume = OmegaConf.select(cfg, "train.resume")
    return bool(resume) and run_path(str(resume)).parent == run_path(out)


MEMBERS = {"sweep job": "sweep's", "replica": "group's"}  # what member_resumed_in_place names, and whose summary


def member_resumed_in_place(cfg, out) -> str:
    """What this run resumes in place where `out` belongs to a larger whole: 'replica' (a replica group's seed<s>,
    listed in its group's status.json) or 'sweep job' (its .hydra/hydra.yaml records hydra.mode MULTIRUN); '' for a
    lone run, or a run that does not resume in place. Its .hydra files then stay its own, so that its sweep's or
    group's summary still counts it where it was (save_resume_overrides records how it was resumed)."""
    from analysis.rundir import is_listed_replica, run_path

    if not resumes_in_place(cfg, out):
        return ""
    if is_listed_replica(run_path(out)):
        return "replica"
    return "sweep job" if is_sweep_job(out) else ""


def is_sweep_job(out) -> bool:
    """Whether `out` holds a sweep's job: its .hydra/hydra.yaml records hydra.mode MULTIRUN (not a lone run)."""
    try:
        saved = OmegaConf.load(Path(out) / ".hydra" / "hydra.yaml")
    except Exception:  # noqa: BLE001  none, or unreadable: not a sweep job's dir that can be told
        return False
    return str(OmegaConf.select(saved, "hydra.mode", default=None)) == "MULTIRUN"


def save_resume_overrides(claim, hc) -> None:
    """.hydra/resume_overrides.yaml: the command line that resumed a sweep job or a replica in place (its own .hydra
    files kept)."""
    folder = Path(claim.path) / ".hydra"
    folder.mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), folder / "resume_overrides.yaml")


def save_hydra_files(claim, cfg, hc) -> None:
    """.hydra/config.yaml, overrides.yaml and hydra.yaml, as Hydra writes them (hydra.output_subdir is null so that
    Hydra itself writes nothing before the run's directory is claimed)."""
    folder = Path(claim.path) / ".hydra"
    folder.mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), folder / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), folder / "overrides.yaml")


def replica_dir(path: Path, cfg) -> Path:
    """Create a replica's run directory (path, inside its job's) holding what its single run's .hydra/ holds:
    config.yaml (the replica's config: that of the single run, seed=<its seed>, replicas: 1), overrides.yaml (the
    job's, with seed=<its seed> replicas=1: `python run.py <them>` runs it alone) and hydra.yaml (the job's, with
    those overrides and this dir); marked running."""
    from hydra.core.hydra_config import HydraConfig

    from analysis.rundir import run_path, write_status

    folder = Path(path) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    try:
        hc = HydraConfig.get()
    except ValueError:  # run.run called without Hydra's app (a test, a notebook)
        hc = None
    own = (f"seed={cfg.seed}", "replicas=1")
    task = [o for o in (hc.overrides.task if hc is not None else [])
            if o.lstrip("+~").partition("=")[0] not in ("seed", "replicas")] + list(own)
    OmegaConf.save(OmegaConf.create(task), folder / "overrides.yaml")
    if hc is not None:
        copy = OmegaConf.create({"hydra": OmegaConf.to_container(hc, resolve=False)})
        with open_dict(copy):
            copy.hydra.overrides.task = task
            copy.hydra.runtime.output_dir = str(run_path(path))
        OmegaConf.save(copy, folder / "hydra.yaml")
    write_status(path, "running")
    return Path(path)


def settle_group() -> None:
    """After a replica resumed in place ended (its status.json, by this process, says how): its group's status.json,
    which its own process, since gone, left as it stood (say 'running', after a SIGKILL), is brought up to date from
    its replicas' (group_outcome). Nothing is written while the group's process or a replica's still runs (the last
    one to end settles it), nor for a run that recorded nothing (refused: its claim put everything back)."""
    from analysis.rundir import is_listed_replica, live_owner, read_status, write_status

    claim = STATE.get("claim")
    if claim is None or not is_listed_replica(claim.path):
        return
    status, group = read_status(claim.path), Path(claim.path).parent
    if status.get("pid") != os.getpid() or status.get("status") in (None, "running") or live_owner(group):
        return
    outcome = group_outcome(group)
    if outcome is not None:
        write_status(group, *outcome[:2], **outcome[2])


def group_outcome(group: Path):
    """(status, reason, extra) of a replica group whose process has ended, from its listed replicas' status.json: ok
    (extra: the mean loss) when every replica ended ok; else diverged where every other one diverged, failed
    otherwise, the reason naming each (a replica whose status still says running, its process gone, was killed).
    None while a replica's run is still running."""
    from analysis.jobs import judge_running
    from analysis.rundir import read_status

    names = read_status(group).get("replicas")
    outcomes, losses = [], []
    for name in names if isinstance(names, list) else []:
        record = read_status(group / name)
        state, why = record.get("status") or "failed", record.get("reason") or "no status.json"
        if state == "running":  # its process gone: killed (the summary's judgement); alive: not ours to settle
            state, why = judge_running(group / name, record)
            if state == "running":
                return None
        outcomes.append((name, state, why))
        losses.append(record.get("loss"))
    bad = [(name, state, why) for name, state, why in outcomes if state != "ok"]
    if not bad:
        numbers = [v for v in losses if isinstance(v, (int, float))]
        mean = sum(numbers) / len(numbers) if numbers and len(numbers) == len(losses) else None
        resumed = [name for name, _, _ in outcomes if (group / name / ".hydra" / "resume_overrides.yaml").exists()]
        return "ok", (f"finished: all {len(outcomes)} replicas ended ok"
                      + (f" ({', '.join(resumed)} resumed in place)" if resumed else "")), {"loss": mean}
    status = "diverged" if all(state == "diverged" for _, state, _ in bad) else "failed"
    return status, (f"{len(bad)} of {len(outcomes)} replicas did not end ok: "
                    + "; ".join(f"{name}: {state}: {why}" for name, state, why in bad)), {}


def to_log_file(line: str, level: int = logging.ERROR) -> None:
    """Log `line` to the run's log file(s) only (the root logger's FileHandlers: run.log), not to the console."""
    record = log.makeRecord(log.name, level, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def fail(claim, status: str, err, multirun: bool, code: int = 2):
    """Record a run that did not end well: one line on stderr (and in run.log), status.json in a sweep job or
    after training, nothing left behind by a single run refused before training. Returns failed_value() for sweepers."""
    line = single_line(err)
    if claim is not None and status in ("diverged", "failed"):  # overwrite=true: the run it replaced stays
        line += claim.kept_note()
    unwritten = ""
    if claim is not None:
        if status == "refused" and not multirun:
            claim.release()
        else:
            try:
                claim.status(status, line)
            except OSError as problem:  # a full disk: the line says so, and what was written stays
                unwritten = f" (its status.json could not be written: {problem.strerror or problem})"
    print(f"error: {line}{unwritten}", file=sys.stderr)
    if multirun and claim is not None:  # a sweep job's run.log says why it failed (not another run's log); the
        to_log_file(line)  # console has the line above once
    if claim is not None and not (status == "refused" and not multirun):
        log.info(f"outputs: {claim.path}")
    STATE["exit"] = max(STATE["exit"], code)
    return failed_value()


def failed_value(sweeper: str = None):
    """What a job that did not end well returns to its sweeper: nan, so that no sweeper mistakes it for a result; None
    under the optuna sweeper, which then marks the trial failed and goes on (optuna refuses nan: the sweep ends).
    sweeper: the sweeper's _target_ (default: the running job's, from HydraConfig)."""
    if sweeper is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            sweeper = str(OmegaConf.select(HydraConfig.get(), "sweeper._target_", default=""))
        except ValueError:  # no Hydra app (a test)
            sweeper = ""
    return None if "optuna" in str(sweeper).lower() else math.nan


def write_json(path, obj) -> None:
    """Write obj to path as indented JSON, atomically (analysis.rundir.write_atomic: a reader never sees half)."""
    from analysis.rundir import write_atomic

    write_atomic(path, json.dumps(obj, indent=2))


def release_unstarted() -> str:
    """Release the single run's claim (preflight's) if its status still says this process is running it: Hydra
    exited, or was interrupted, before the task recorded how the run ended (nothing of it is left behind, and a run
    it was to replace goes back whole). Returns what became of the dir ('' where nothing was released)."""
    from analysis.rundir import read_status

    claim = STATE.get("claim")
    if claim is None:
        return ""
    status = read_status(claim.path)
    if status.get("status") != "running" or status.get("pid") != os.getpid() or claim.started:
        return ""  # ended, another's, or trained (what it wrote stays: a status.json a full disk left 'running')
    replaced = bool(claim.moved)
    claim.release()
    return (f"the run that was in {claim.path} is kept as it was" if replaced
            else f"nothing was written in {claim.path}")
