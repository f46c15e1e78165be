"""A multirun checked before any job runs: its jobs (as Hydra's basic sweeper makes them), no seed trained twice,
every job directory creatable, and the sweep directory claimed for this sweep alone (claim_sweep's lock).
"""
import os
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from analysis.jobs import SWEEP_LOCK, launch_line, launch_of
from cli.keys import compose_config, parse_overrides, single_line
from cli.signals import STOPPING
from cli.state import STATE, ConfigError
from cli.values import is_unresolvable, unresolved

DEFAULT_SUBDIR = "${hydra:job.override_dirname}"  # conf/config.yaml's hydra.sweep.subdir: job dirs named by values


def sweep_jobs(overrides, cfg):
    """Every job of the sweep, as the overrides Hydra's basic sweeper gives it (the config's hydra.sweeper.params,
    then the command line, which wins), in Hydra's order (job number i is item i); None for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    if "BasicSweeper" not in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")):
        return None
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    check_enumerable(args, given=len(args) - len(overrides))
    check_distinct_values(args)
    try:
        return BasicSweeper.split_arguments(parse_overrides(args), None)[0]
    except Exception:  # noqa: BLE001  a sweep the basic sweeper refuses: Hydra says so itself
        return None


def check_enumerable(args, given: int = 0) -> None:
    """Refuse, in one line naming the key, a sweep the basic sweeper cannot list the values of: interval() (also
    inside tag()), which a sampling sweeper draws from (Hydra: a traceback once the sweep dir was made). args: the
    config's hydra.sweeper.params (the first `given`) then the command line."""
    for i, o in enumerate(parse_overrides(args)):
        if o.is_sweep_override() and not o.is_discrete_sweep():
            where = " (in the config's hydra.sweeper.params)" if i < given else ""
            raise ConfigError(f"{o.input_line}{where} is not allowed: {o.key_or_group} sweeps an interval(), which "
                              "needs a sweeper that samples (hydra/sweeper=optuna); the basic sweeper runs listed "
                              f"values: {o.key_or_group}=a,b,c or range(start,stop,step)")


def check_distinct_values(args) -> None:
    """Refuse, in one line naming the key and both spellings, a sweep that lists one value of a key twice: written
    two ways that Hydra and OmegaConf read as one (1 and 1.0, 1e-3 and 0.001, 'x' and x, true and True), or the same
    way twice; two jobs would train one configuration (as two configurations, or into one job dir). Each key's last
    override counts (the command line replaces the config's hydra.sweeper.params)."""
    from analysis.jobs import canonical_value

    last = {o.get_key_element(): o for o in parse_overrides(args)}
    for key, o in last.items():
        if not (o.is_sweep_override() and o.is_discrete_sweep()):
            continue
        seen = {}
        for text in o.sweep_string_iterator():  # as each job gets it: key=<text>
            value = canonical_value(parse_overrides([f"{key}={text}"])[0].value())
            if value in seen:
                twice = (f"{seen[value]} and {text} are one value of {o.key_or_group} written two ways"
                         if seen[value] != text else f"it lists the value {text} of {o.key_or_group} twice")
                raise ConfigError(f"{o.input_line} is not allowed: {twice} (as Hydra reads them), so two jobs would "
                                  "train the same configuration; list each value once")
            seen[value] = text


def check_some_job_runs(jobs) -> None:
    """Refuse, before any job starts, a sweep whose every job would be refused for its config's values (a bad value
    they share, e.g. `-m data.n=1,5 train.steps=-1`): ConfigError in one line naming the key, as a single run's.
    A sweep in which some job runs starts: each refused job is recorded in the sweep dir, and its summary lists it.
    Composes one job's config where the first one is fine (all of them only when the first is refused)."""
    from cli.values import validate

    first = None
    for job in jobs:
        try:
            validate(compose_config(list(job), hydra_cfg=True))
            return
        except ConfigError as err:
            if "interpolation" in str(err):  # e.g. ${hydra:...}, which resolves only inside a job: the job judges
                return
            first = first or err
        except Exception:  # noqa: BLE001  a job Hydra cannot compose: Hydra says so in the job
            return
    if first is not None:
        raise ConfigError(f"{single_line(first)} (every one of the sweep's {len(jobs)} jobs is refused, this is the "
                          "first one's reason: none was started)")


def _settings(job) -> dict:
    """{key: value} of a job's app overrides (hydra.* left out)."""
    out = {}
    for line in job:
        key, _, value = line.partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra"):
            out[key] = value
    return out


def check_seed_overlap(jobs, cfg) -> None:
    """Refuse a sweep in which two jobs of one configuration train the same seed: a job trains the seeds seed ..
    seed + replicas - 1, so seed=0,1 with replicas=2 trains seed 1 twice (the summary would count it twice)."""
    base_seed, base_replicas = cfg.get("seed", 0), cfg.get("replicas", 1)
    owner = {}
    for job in jobs:
        settings = _settings(job)
        try:
            seed = int(settings.get("seed", base_seed))
            replicas = int(settings.get("replicas", base_replicas))
        except (TypeError, ValueError):
            continue  # a bad value: its job is refused with the rule's own message
        rest = frozenset((k, v) for k, v in settings.items() if k not in ("seed", "replicas"))
        for s in range(seed, seed + max(replicas, 1)):
            other = owner.setdefault((rest, s), (seed, replicas))
            if other != (seed, replicas):
                raise ConfigError(
                    f"seed and replicas: seed {s} would be trained twice, by the job seed={other[0]} "
                    f"(replicas={other[1]}: seeds {other[0]}..{other[0] + other[1] - 1}) and by seed={seed} "
                    f"(replicas={replicas}: seeds {seed}..{seed + replicas - 1}); sweep seeds at least replicas "
                    f"apart (seed=0,{max(replicas, other[1])},...) or raise replicas instead")


def job_subdir(job, num: int, cfg) -> str:
    """The job directory name Hydra will give job number num (hydra.sweep.subdir, resolved as Hydra does)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.hydra_config import HydraConfig

    od = cfg.hydra.job.config.override_dirname
    parsed = [o for o in parse_overrides(job) if not o.is_hydra_override()]
    name = get_overrides_dirname(parsed, exclude_keys=list(od.exclude_keys), item_sep=od.item_sep,
                                 kv_sep=od.kv_sep)
    raw = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir")
    if raw == DEFAULT_SUBDIR:
        return name
    from omegaconf import read_write

    copy = compose_config(job, hydra_cfg=True)  # the job's own config (a subdir may name any of its keys)
    with read_write(copy.hydra), open_dict(copy.hydra):
        copy.hydra.job.num = num
    HydraConfig.instance().set_config(copy)
    return str(OmegaConf.select(copy, "hydra.sweep.subdir"))


def check_job_dirs(jobs, cfg, sweep_dir: Path) -> None:
    """Refuse, before any job runs, a sweep one of whose job directories cannot be created: a file where it (or a
    folder above it) would be, a name longer than the filesystem allows, a path longer than it allows."""
    probe = sweep_dir
    while not probe.exists():
        probe = probe.parent
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    taken = {}
    for num, job in enumerate(jobs):
        try:
            subdir = job_subdir(job, num, cfg)
        except Exception as err:  # noqa: BLE001  an exotic subdir: Hydra resolves it itself
            if is_unresolvable(err):  # Hydra's traceback mid-launch, the sweep dir made
                raise unresolved(compose_config(job, hydra_cfg=True), "hydra.sweep.subdir", err,
                                 "name each job's dir (e.g. 'hydra.sweep.subdir=${hydra:job.num}')") from None
            return
        path = sweep_dir / subdir
        what = " ".join(j for j in job if not j.lstrip("+~").startswith("hydra")) or "the job"
        what = what if len(what) <= 100 else what[:97] + "..."
        by_values = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir") == DEFAULT_SUBDIR
        inside = os.path.normpath(path).startswith(os.path.normpath(sweep_dir) + os.sep)
        if os.path.normpath(path) == os.path.normpath(sweep_dir):  # -m with no override that names a job dir
            why = (" (no override of the job names it: overwrite, eval.figures and train.progress are left out of "
                   "job dir names)" if by_values else f" (hydra.sweep.subdir is '{subdir}')")
            raise ConfigError(f"hydra.sweep.subdir: the job dir of {what} would be the sweep dir {sweep_dir} itself"
                              f"{why}, where the sweep's summary goes: sweep a key (e.g. -m seed=0,1), run it as a "
                              "single run (without -m), or set 'hydra.sweep.subdir=${hydra:job.num}'")
        if not inside or (by_values and len(Path(subdir).parts) != 1):  # a '/' in a value: folders, or a way out
            shown = subdir if len(subdir) <= 80 else subdir[:77] + "..."
            raise ConfigError(f"hydra.sweep.subdir: the job dir of {what} would be '{shown}', "
                              + (f"outside {sweep_dir} ('..' leaves it)" if not inside else
                                 f"not one folder in {sweep_dir} (a '/' in an override value, such as a path, "
                                 "makes folders)")
                              + ": list that key in hydra.job.config.override_dirname.exclude_keys, or set "
                              "'hydra.sweep.subdir=${hydra:job.num}'")
        if path in taken:
            raise ConfigError(f"hydra.sweep.subdir: the jobs {taken[path]} and {what} would share the job dir "
                              f"{path} (overwrite, eval.figures and train.progress change no result and are left "
                              "out of job dir names): sweep values that differ, or a hydra.sweep.subdir that tells "
                              "them apart")
        taken[path] = what
        for part in Path(subdir).parts:
            if len(part.encode()) > name_max:
                raise ConfigError(
                    f"hydra.sweep.subdir: the job dir of {what} would be named '{part[:40]}...' ({len(part.encode())} "
                    f"bytes); this filesystem allows names of at most {name_max}: sweep fewer overrides, list "
                    "constant ones in hydra.job.config.override_dirname.exclude_keys, or set "
                    "'hydra.sweep.subdir=${hydra:job.num}'")
        if len(str(path).encode()) >= path_max:
            raise ConfigError(f"hydra.sweep.dir: the job dir of {what} would be a path of {len(str(path).encode())} "
                              f"bytes; this filesystem allows at most {path_max - 1}: choose a shorter hydra.sweep.dir")
        for folder in [path, *path.parents]:
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"hydra.sweep.dir: {folder} is a file where the job dir of {what} would be; "
                                  "move it, or choose another hydra.sweep.dir")
            if folder == sweep_dir.parent:
                break


def holds_sweep(sweep_dir: Path) -> bool:
    """Whether sweep_dir holds an earlier sweep: its multirun.yaml (Hydra's basic sweeper), optimization_results.yaml
    (the optuna sweeper, which writes no multirun.yaml), or a sweep's job dir (a folder whose .hydra/hydra.yaml says
    MULTIRUN, as optuna's jobs leave them before its results are written). A lone run there is not a sweep: the job
    that maps onto its dir is refused, and the others run."""
    if any((sweep_dir / name).exists() for name in ("multirun.yaml", "optimization_results.yaml")):
        return True
    try:
        children = [child for child in sweep_dir.iterdir() if child.is_dir()]
    except OSError:
        return False
    for child in children:
        try:
            if "mode: MULTIRUN" in (child / ".hydra" / "hydra.yaml").read_text():
                return True
        except OSError:
            continue
    return False


def claim_sweep(sweep_dir: Path, overwrite: bool) -> None:
    """Claim sweep_dir for this sweep alone: an exclusive lock on <sweep_dir>/.sweep.lock, held until this process
    ends (the kernel drops it with the process, so a killed sweep leaves no stale claim). Raises RunDirError if
    another sweep holds it, or if it already holds a sweep (holds_sweep) and overwrite is false; a
    refused claim removes what it created. A sweep_dir that holds a run, or lies inside a run's directory, is
    refused before anything is created."""
    import fcntl

    from analysis.rundir import RunDirError, is_run, occupant

    for folder in [sweep_dir, *sweep_dir.parents]:  # no sweep writes into a run's dir (its lock, summary, job dirs)
        held = occupant(folder) if folder == sweep_dir else ("a run" if is_run(folder) else "")
        if held:
            where = "it holds" if folder == sweep_dir else f"it is inside the run directory {folder}, which holds"
            raise RunDirError(f"hydra.sweep.dir={sweep_dir} is not allowed: {where} {held}; no sweep writes into a "
                              "run's directory: choose a hydra.sweep.dir outside it")
    created = [p for p in [sweep_dir, *sweep_dir.parents] if not p.exists()]
    lock = sweep_dir / SWEEP_LOCK
    new_lock = not lock.exists()
    try:
        earlier = b"" if new_lock else lock.read_bytes()  # the last launch's id (analysis.jobs.launch_of)
    except OSError:
        earlier = b""

    def undo(fd):
        if new_lock:
            lock.unlink(missing_ok=True)
        elif earlier:  # the sweep that was there stays the last launched: its summary still finds its jobs
            os.ftruncate(fd, 0)
            os.pwrite(fd, earlier, 0)
        os.close(fd)
        for folder in created:  # innermost first; only while empty
            try:
                folder.rmdir()
            except OSError:
                break

    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise RunDirError(f"cannot create the sweep dir {sweep_dir}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = launch_of(sweep_dir)  # its launch id; '' where the lock's line is none (junk, not text)
        os.close(fd)
        raise RunDirError(f"sweep dir {sweep_dir} is in use by another sweep ({holder or 'still running'}); wait "
                          "for it to end, or choose another hydra.sweep.dir") from None
    if holds_sweep(sweep_dir) and not overwrite:
        undo(fd)
        raise RunDirError(f"sweep dir {sweep_dir} already holds a sweep; choose another hydra.sweep.dir, or "
                          "set overwrite=true")
    os.ftruncate(fd, 0)
    os.write(fd, f"{launch_line()}\n".encode())
    (sweep_dir / STOPPING).unlink(missing_ok=True)  # an earlier launch's, killed while it stopped its workers
    STATE["sweep_lock"] = fd
    STATE["sweep_undo"] = lambda: undo(fd)  # a sweep its sweeper refuses before any job (cli.optuna_sweep) leaves none
