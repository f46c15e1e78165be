"""The joblib launcher's settings, checked before a sweep starts: joblib refuses a bad one only once the sweep has
begun (a traceback, a sweep dir of missing jobs), or takes it silently (an unknown key, a backend it ignores)."""
import re

from omegaconf import OmegaConf

from cli.state import ConfigError
from infer.validate import is_int

BACKENDS = (None, "loky", "multiprocessing", "threading")
DISPATCH = re.compile(r"\s*(all|\d+|(\d+\s*\*\s*)?n_jobs)\s*")  # joblib's pre_dispatch: 'all', N or 'k*n_jobs'


# key -> (test, what is allowed); hydra_plugins.hydra_joblib_launcher.config.JobLibLauncherConf's keys
RULES = {
    "n_jobs": (lambda v: is_int(v) and v != 0, "an integer other than 0 (-1: one job per core)"),
    "backend": (lambda v: v in BACKENDS, "null, loky, multiprocessing or threading"),
    "prefer": (lambda v: v in ("processes", "threads"), "processes or threads"),
    "require": (lambda v: v in (None, "sharedmem"), "null or sharedmem"),
    "verbose": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "timeout": (lambda v: v is None, "null: a job joblib times out is killed with no record of it (no status.json, "
                                     "listed as missing); stop a sweep with SIGINT or SIGTERM instead"),
    "pre_dispatch": (lambda v: is_int(v) and v >= 1 or isinstance(v, str) and DISPATCH.fullmatch(v) is not None,
                     "all, an integer >= 1 or k*n_jobs"),
    "batch_size": (lambda v: v == "auto", "auto (the launcher's schema makes it a string, which joblib takes only "
                                          "as auto)"),
    "temp_folder": (lambda v: v is None or isinstance(v, str) and v.strip() != "", "null or a folder's path"),
    "max_nbytes": (lambda v: v is None or is_int(v) and v >= 0 or isinstance(v, str)
                   and re.fullmatch(r"\d+[KMG]?", v) is not None, "null, an integer >= 0 or a size such as 1M"),
    "mmap_mode": (lambda v: v in (None, "r+", "r", "w+", "c"), "null, r+, r, w+ or c"),
}


def check_launcher(cfg) -> None:
    """Raise ConfigError (one line naming hydra.launcher.<key> and what it allows) for a joblib launcher setting
    joblib would refuse once the sweep has started, or ignore; other launchers are left to Hydra."""
    launcher = OmegaConf.select(cfg, "hydra.launcher")
    if launcher is None or "joblib" not in str(launcher.get("_target_", "")):
        return
    values = OmegaConf.to_container(launcher, resolve=True)
    for key, value in values.items():
        if key == "_target_":
            continue
        if key not in RULES:
            raise ConfigError(f"hydra.launcher.{key} is not a setting of the joblib launcher (it has "
                              f"{', '.join(RULES)})")
        test, allowed = RULES[key]
        if not test(value):
            raise ConfigError(f"hydra.launcher.{key}={value!r} is not allowed: hydra.launcher.{key} must be {allowed}")
