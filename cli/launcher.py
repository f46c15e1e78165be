"""The launcher's settings, checked before a sweep starts (the sweeper's: cli.sweeper). The launchers refuse a bad
one only once the sweep has begun (a traceback, a sweep dir of missing jobs), or take it silently (an unknown key, a
setting they ignore): Hydra's basic launcher has no settings, joblib's and submitit's are checked here against what
works for a job of this app (one process that writes one run dir); another launcher is left to Hydra."""
import math
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from cli.state import ConfigError
from infer.validate import _int_at_least, is_int

BACKENDS = (None, "loky", "multiprocessing", "threading")
DISPATCH = re.compile(r"\s*(all|\d+|(\d+\s*\*\s*)?n_jobs)\s*")  # joblib's pre_dispatch: 'all', N or 'k*n_jobs'


def _or_null(test):
    return lambda v: v is None or test(v)


def _text(null: bool = True):
    return lambda v: (null and v is None) or (isinstance(v, str) and v.strip() != "")


# key -> (test, what is allowed); hydra_plugins.hydra_joblib_launcher.config.JobLibLauncherConf's keys
JOBLIB = {
    "n_jobs": (lambda v: is_int(v) and v != 0, "an integer other than 0 (-1: one job per core)"),
    "backend": (lambda v: v in BACKENDS, "null, loky, multiprocessing or threading"),
    "prefer": (lambda v: v in ("processes", "threads"), "processes or threads"),
    "require": (lambda v: v in (None, "sharedmem"), "null or sharedmem"),
    "verbose": (_int_at_least(0), "an integer >= 0"),
    "timeout": (lambda v: v is None, "null: a job joblib times out is killed with no record of it (no status.json, "
                                     "listed as missing); stop a sweep with SIGINT or SIGTERM instead"),
    "pre_dispatch": (lambda v: is_int(v) and v >= 1 or isinstance(v, str) and DISPATCH.fullmatch(v) is not None,
                     "all, an integer >= 1 or k*n_jobs"),
    "batch_size": (lambda v: v == "auto", "auto (the launcher's schema makes it a string, which joblib takes only "
                                          "as auto)"),
    "temp_folder": (_text(), "null or a folder's path"),
    "max_nbytes": (lambda v: v is None or is_int(v) and v >= 0 or isinstance(v, str)
                   and re.fullmatch(r"\d+[KMG]?", v) is not None, "null, an integer >= 0 or a size such as 1M"),
    "mmap_mode": (lambda v: v in (None, "r+", "r", "w+", "c"), "null, r+, r, w+ or c"),
}

# hydra_plugins.hydra_submitit_launcher.config.LocalQueueConf's keys (BaseQueueConf's)
SUBMITIT = {
    "submitit_folder": (_text(null=False), "a folder's path (submitit's logs and pickles; %j: the job id)"),
    "timeout_min": (_int_at_least(1), "an integer >= 1 (minutes; a job past it is stopped, and requeued up to "
                                      "max_num_timeout times, resuming from its checkpoint.pt)"),
    "signal_delay_s": (_int_at_least(0), "an integer >= 0"),
    "max_num_timeout": (_int_at_least(0), "an integer >= 0 (requeues after a timeout or preemption, each resuming "
                                          "from the job's checkpoint.pt; submitit's default: 3 for submitit_local, "
                                          "0 for submitit_slurm)"),
    "cpus_per_task": (_or_null(_int_at_least(1)), "null or an integer >= 1"),
    "gpus_per_node": (_or_null(_int_at_least(0)), "null or an integer >= 0"),
    "tasks_per_node": (lambda v: v == 1, "1: each task runs the whole job, so two tasks would train one run twice "
                                         "into one dir (replicas=R trains R seeds in one task)"),
    "mem_gb": (_or_null(_int_at_least(1)), "null or an integer >= 1"),
    "nodes": (lambda v: v == 1, "1: a job is one process on one node"),
    "name": (_text(null=False), "a job name"),
    "stderr_to_stdout": (lambda v: isinstance(v, bool), "true or false"),
    "setup": (lambda v: v is None or isinstance(v, list) and all(isinstance(c, str) for c in v),
              "null or a list of shell commands"),  # not in LocalQueueConf (+hydra.launcher.setup=...): submitit's own
}

# hydra_plugins.hydra_submitit_launcher.config.SlurmQueueConf's keys besides BaseQueueConf's
SLURM = {
    **{key: (_text(), "null or a string") for key in ("partition", "qos", "comment", "constraint", "exclude", "gres",
                                                       "mem_per_gpu", "mem_per_cpu", "account")},
    "cpus_per_gpu": (_or_null(_int_at_least(1)), "null or an integer >= 1"),
    "gpus_per_task": (_or_null(_int_at_least(1)), "null or an integer >= 1"),
    "additional_parameters": (lambda v: isinstance(v, dict), "a mapping of sbatch options"),
    "array_parallelism": (_int_at_least(1), "an integer >= 1"),
}

# the launcher's class name (its _target_'s last part) -> (its name on the command line, its settings)
LAUNCHERS = {"BasicLauncher": ("basic", {}), "JoblibLauncher": ("joblib", JOBLIB),
             "LocalLauncher": ("submitit_local", SUBMITIT), "SlurmLauncher": ("submitit_slurm", {**SUBMITIT, **SLURM})}


def _writable_place(path: Path) -> bool:
    """Whether `path` is, or can be created as, a folder (the folders this creates to find out are removed)."""
    created = [p for p in [path, *path.parents] if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path.is_dir()
    except OSError:
        return False
    finally:
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break


def allowed_setting(key: str):
    """What hydra.launcher.<key> allows in the first known launcher that has it, or None."""
    for _, rules in LAUNCHERS.values():
        if key in rules:
            return rules[key][1]
    return None


def check_settings(section: str, owner: str, rules: dict, values: dict) -> None:
    """Raise ConfigError (one line naming <section>.<key> and what it allows) for a key of `values` that `rules`
    (key -> (test, what is allowed)) does not have, or a value its test refuses; _target_ and defaults are Hydra's."""
    for key, value in values.items():
        if key in ("_target_", "defaults"):
            continue
        if key not in rules:
            has = f"it has {', '.join(rules)}" if rules else "it has none"
            raise ConfigError(f"{section}.{key} is not a setting of {owner} ({has})")
        test, allowed = rules[key]
        if not test(value):
            raise ConfigError(f"{section}.{key}={value!r} is not allowed: {section}.{key} must be {allowed}")


def checked_section(cfg, section: str, table: dict, resolve: bool = True):
    """The settings {key: value} of cfg's hydra.<section> (launcher, sweeper), checked by check_settings against the
    rules of its kind in `table` ({class name: (its command-line name, its rules)}); None for a kind not there
    (left to Hydra)."""
    node = OmegaConf.select(cfg, f"hydra.{section}")
    if node is None:
        return None
    kind = str(node.get("_target_", "")).rpartition(".")[2]
    if kind not in table:
        return None
    name, rules = table[kind]
    values = OmegaConf.to_container(node, resolve=resolve, enum_to_str=True)
    check_settings(f"hydra.{section}", f"the {name} {section}", rules, values)
    return values


def check_launcher(cfg) -> None:
    """Raise ConfigError (one line naming hydra.launcher.<key> and what it allows) for a launcher setting the
    launcher would refuse once the sweep has started, or ignore, or that would break a job (basic, joblib,
    submitit_local, submitit_slurm); another launcher is left to Hydra."""
    values = checked_section(cfg, "launcher", LAUNCHERS)
    if values is None:
        return
    kind = str(OmegaConf.select(cfg, "hydra.launcher._target_")).rpartition(".")[2]
    if "submitit_folder" in values:
        folder = Path(values["submitit_folder"].split("%j")[0]).absolute()
        if not _writable_place(folder):
            raise ConfigError(f"hydra.launcher.submitit_folder={values['submitit_folder']!r} is not allowed: "
                              f"{folder} cannot be created (hydra.launcher.submitit_folder must be a folder this "
                              "process can write)")
    if kind == "SlurmLauncher" and shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=submitit_slurm is not allowed here: SLURM's sbatch is not on PATH (on this "
                          "machine use hydra/launcher=submitit_local or joblib)")


def check_gpus(cfg, jobs=None) -> None:
    """Raise ConfigError (one line naming device or hydra.launcher.gpus_per_node) where the submitit launchers' GPUs
    and the jobs' devices do not fit: submitit gives a job only the GPUs it asks for (CUDA_VISIBLE_DEVICES lists
    gpus_per_node of them, none by default), so a device=cuda[:k] job needs gpus_per_node > k (under submitit_slurm
    gpus_per_task or a gres naming a gpu do too); a GPU asked for by cpu-only jobs would be held and never used; and
    submitit_local runs its jobs on this machine, which must have the GPUs. jobs: the sweep's override lists (the
    devices they set; None: cfg.device alone). A no-op under the other launchers."""
    kind = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="")).rpartition(".")[2]
    if kind not in ("LocalLauncher", "SlurmLauncher"):
        return
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    asked = launcher.get("gpus_per_node") or 0
    asked = asked if is_int(asked) else 0
    from analysis.jobs import canonical

    devices = {canonical(line.partition("=")[2]) for job in jobs or [] for line in job  # 'cuda:1' is cuda:1
               if line.lstrip("+~").partition("=")[0] == "device"} or {str(cfg.get("device", "cpu"))}
    slurm_gpus = kind == "SlurmLauncher" and (launcher.get("gpus_per_task") or "gpu" in str(launcher.get("gres")))
    for device in sorted(d for d in devices if d.startswith("cuda")):
        index = device.partition(":")[2]
        needed = int(index) + 1 if index.isdigit() else 1
        if asked < needed and not slurm_gpus:
            given = launcher.get("gpus_per_node")
            raise ConfigError(f"device={device} is not allowed with hydra.launcher.gpus_per_node="
                              f"{'null' if given is None else given}: submitit gives a job only the GPUs it asks "
                              f"for, so the job would see no {device}; set hydra.launcher.gpus_per_node={needed}")
    if asked and all(d == "cpu" for d in devices):
        raise ConfigError(f"hydra.launcher.gpus_per_node={asked} is not allowed with device=cpu: every job would hold "
                          f"{asked} GPU(s) it never uses; set device=cuda, or hydra.launcher.gpus_per_node=0")
    if kind == "LocalLauncher" and asked:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if asked > count:
            raise ConfigError(f"hydra.launcher.gpus_per_node={asked} is not allowed here: this machine has {count} "
                              f"CUDA device(s), and submitit_local runs its jobs on it; hydra.launcher.gpus_per_node "
                              f"must be at most {count}")


def tolerate_lost_jobs(value=math.nan) -> None:
    """Under the submitit launchers, a job that ends without a result (killed: SIGKILL, out of memory, cancelled)
    makes Hydra's launcher raise at once, with a traceback, while the other jobs still run, unwatched, and the sweep
    summary is written before they end. Patched here: such a job's result is a completed job that returns `value`
    (that of any job that did not end well: cli.rundirs.failed_value), after the launcher has waited for every job;
    its status.json still says running, and the summary lists it as killed (analysis.jobs). A no-op without
    submitit."""
    try:
        from submitit.core import core, utils
    except ImportError:
        return
    results = getattr(core.Job.results, "original", core.Job.results)

    def tolerant(job):
        try:
            return results(job)
        except utils.UncompletedJobError:
            from hydra.core.utils import JobReturn, JobStatus

            return [JobReturn(status=JobStatus.COMPLETED, _return_value=value)]

    tolerant.original = results
    core.Job.results = tolerant
