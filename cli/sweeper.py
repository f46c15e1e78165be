"""The sweeper's settings, checked before a sweep starts. Hydra's basic sweeper and the optuna sweeper refuse a bad
setting only once the sweep has begun (an AssertionError or TypeError traceback, exit 1), or take it and fail every
trial (a second optimisation direction: run.py returns one number). Checked here against what works for this app;
another sweeper is left to Hydra. What a wrong-typed value allows is named too (cli.keys.composition_error)."""
from cli.keys import single_line
from cli.launcher import _or_null, _text, checked_section
from cli.state import ConfigError
from infer.validate import _int_at_least, is_int

DIRECTIONS = ("minimize", "maximize")


def _mapping_or_null(v) -> bool:
    return v is None or isinstance(v, dict)


def _rate(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1


# key -> (test, what is allowed); hydra's BasicSweeperConf
BASIC = {
    "max_batch_size": (_or_null(_int_at_least(1)), "null or an integer >= 1 (jobs launched at a time)"),
    "params": (_mapping_or_null, "null or a mapping of keys to sweeps"),
}

# hydra_plugins.hydra_optuna_sweeper.config.OptunaSweeperConf
OPTUNA = {
    "sampler": (lambda v: isinstance(v, dict), "a sampler (hydra/sweeper/sampler=tpe, random, cmaes, nsgaii, motpe or "
                                               "grid)"),
    "direction": (lambda v: v in DIRECTIONS or isinstance(v, list) and len(v) == 1 and v[0] in DIRECTIONS,
                  "minimize or maximize: a job returns one number, its headline loss (a second direction would fail "
                  "every trial)"),
    "storage": (_text(), "null or a storage URL (e.g. sqlite:///study.db)"),
    "study_name": (_text(), "null or a name"),
    "n_trials": (_int_at_least(1), "an integer >= 1"),
    "n_jobs": (_int_at_least(1), "an integer >= 1 (trials launched at a time)"),
    "max_failure_rate": (_rate, "a number in [0, 1] (the share of a batch's trials that may fail before the sweep "
                                "stops; 1: never stop)"),
    "search_space": (_mapping_or_null, "null or a mapping of keys to distributions"),
    "params": (_mapping_or_null, "null or a mapping of keys to sweeps"),
    "custom_search_space": (_text(), "null or the dotted path of a function (config, trial) -> None"),
}

# the sweeper's class name (its _target_'s last part) -> (its name on the command line, its settings)
SWEEPERS = {"BasicSweeper": ("basic", BASIC), "OptunaSweeper": ("optuna", OPTUNA)}


def _sampler_keys(target: str):
    """The keys of the optuna sampler config whose _target_ is `target` (the plugin's dataclasses), or None."""
    import dataclasses

    try:
        from hydra_plugins.hydra_optuna_sweeper import config
    except ImportError:
        return None
    for node in vars(config).values():
        if dataclasses.is_dataclass(node) and isinstance(node, type) and getattr(node, "_target_", None) == target:
            return [f.name for f in dataclasses.fields(node)]
    return None


def allowed_setting(key: str):
    """What hydra.sweeper.<key> allows in the first known sweeper that has it, or None."""
    for _, rules in SWEEPERS.values():
        if key in rules:
            return rules[key][1]
    return None


def check_sweeper(cfg) -> None:
    """Raise ConfigError (one line naming hydra.sweeper.<key> and what it allows) for a sweeper setting the sweeper
    would refuse once the sweep has started, or that would fail every job (basic and optuna sweepers; the optuna
    sampler's keys and seed); another sweeper is left to Hydra."""
    values = checked_section(cfg, "sweeper", SWEEPERS, resolve=False)
    if values is None:
        return
    custom = values.get("custom_search_space")
    if custom:
        import logging

        from hydra.utils import get_method

        quiet = logging.getLogger("hydra.utils")  # get_method logs the error on several lines before raising it
        quiet.disabled = True
        try:
            get_method(custom)
        except Exception as err:  # noqa: BLE001  Hydra's: the path cannot be imported, or is no callable
            raise ConfigError(f"hydra.sweeper.custom_search_space={custom!r} is not allowed: "
                              f"{single_line(err)}; it must be the dotted path of a function (config, trial) -> None"
                              ) from None
        finally:
            quiet.disabled = False
    sampler = values.get("sampler")
    if isinstance(sampler, dict):
        keys = _sampler_keys(sampler.get("_target_"))
        for key, value in sampler.items():
            if keys is not None and key not in keys:
                raise ConfigError(f"hydra.sweeper.sampler.{key} is not a setting of the {sampler.get('_target_')} "
                                  f"sampler (it has {', '.join(k for k in keys if k != '_target_')})")
            if key == "seed" and not (value is None or is_int(value) and 0 <= value < 2**32):
                raise ConfigError(f"hydra.sweeper.sampler.seed={value!r} is not allowed: hydra.sweeper.sampler.seed "
                                  "must be null or an integer in [0, 2**32 - 1]")
