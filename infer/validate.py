"""Argument checks: the one table of what every training, data and network argument may be.

    RULES[name] = (test, allowed): test(value) is True for an allowed value; `allowed` says what is allowed, in
    words. Names are the library's argument names (lr, steps, n, ...). CONFIG_KEYS maps a config key (optim.lr) to
    its argument name, and CONFIG_RULES is RULES under the config keys, for run.py's checks.
    check(name, value) raises ValueError in one line, `<label>=<value> is not allowed: <label> must be <allowed>`.

Numbers must be real numbers (not bool, not strings) and finite where the table says so: a learning rate or a KL
weight of inf or nan can only diverge, so it is refused before any work.
"""
import math
import numbers

SCHEDULES = ("exponential", "cosine", "constant")
NOISE = ("mc", "qmc", "lattice")
ACTIVATIONS = ("elu", "relu", "tanh", "silu", "softplus")
INITS = ("reset", "keep")
ENGINES = ("auto", "general")


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_finite(v) -> bool:
    return is_number(v) and math.isfinite(v)


def _int_at_least(low):
    return lambda v: is_int(v) and v >= low


def _pair(test):
    def check(v):
        try:
            return len(v) == 2 and all(test(b) for b in v)
        except TypeError:
            return False
    return check


def _weights(v) -> bool:
    try:
        return (len(v) == 2 and all(is_finite(w) and w > 0 for w in v) and abs(sum(v) - 1) <= 1e-9)
    except TypeError:
        return False


RULES = {
    # training (infer.fit)
    "steps": (_int_at_least(1), "an integer >= 1"),
    "lr": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "lr_final": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "schedule": (lambda v: v in SCHEDULES, " or ".join(SCHEDULES)),
    "adam_betas": (_pair(lambda b: is_finite(b) and 0 <= b < 1), "two numbers in [0, 1)"),
    "beta": (lambda v: is_finite(v) and v >= 0, "a finite number >= 0"),
    "warmup": (_int_at_least(0), "an integer >= 0"),
    "warmup_start": (lambda v: is_finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "seed": (lambda v: v is None or (is_int(v) and v >= 0), "an integer >= 0 (or None)"),
    "log_every": (_int_at_least(1), "an integer >= 1"),
    "checkpoint_every": (_int_at_least(0), "an integer >= 0 (0: never)"),
    "threads": (lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1 (or None: leave torch's setting)"),
    "init": (lambda v: v in INITS, " or ".join(INITS)),
    "progress": (lambda v: isinstance(v, bool), "true or false"),
    "freeze_model": (lambda v: isinstance(v, bool), "true or false"),
    "engine": (lambda v: v in ENGINES, " or ".join(ENGINES)),
    # objectives (infer.elbo)
    "num_particles": (_int_at_least(1), "an integer >= 1"),
    "noise": (lambda v: v in NOISE, " or ".join(NOISE)),
    "free_bits": (lambda v: is_finite(v) and v >= 0, "a finite number >= 0"),
    "closed_form": (lambda v: isinstance(v, bool), "true or false"),
    "K": (_int_at_least(1), "an integer >= 1"),
    # data (models.OneBit)
    "n": (_int_at_least(1), "an integer >= 1"),
    "weights": (_weights, "two positive finite numbers that sum to 1"),
    # networks (models, guides)
    "latent_dim": (_int_at_least(1), "an integer >= 1"),
    "depth": (_int_at_least(2), "an integer >= 2"),
    "hidden": (_int_at_least(1), "an integer >= 1"),
    "layers": (_int_at_least(0), "an integer >= 0"),
    "prior_hidden": (_int_at_least(1), "an integer >= 1"),
    "prior_layers": (_int_at_least(0), "an integer >= 0"),
    "upper_hidden": (_int_at_least(1), "an integer >= 1"),
    "upper_layers": (_int_at_least(0), "an integer >= 0"),
    "activation": (lambda v: v in ACTIVATIONS, ", ".join(ACTIVATIONS[:-1]) + " or " + ACTIVATIONS[-1]),
    "min_scale": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "gain": (lambda v: isinstance(v, bool), "true or false"),
    "prior_gain": (lambda v: isinstance(v, bool), "true or false"),
    "gain_rate": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "prior_gain_rate": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "average": (lambda v: is_finite(v) and 0 <= v < 1, "a number in [0, 1): the fraction of the last steps whose "
                "iterates are averaged (0: none)"),
    "gain_floor": (lambda v: v is None or is_finite(v), "null (no floor) or a finite number (the lowest log-gain)"),
}
RULES["prior_gain_floor"] = RULES["gain_floor"]  # the DLGM's name for its prior nets' gain floor

# config key -> argument name (run.py's keys; the guide's network keys share the model's rules)
CONFIG_KEYS = {
    "data.n": "n", "data.weights": "weights", "seed": "seed", "threads": "threads",
    "train.steps": "steps", "train.num_particles": "num_particles", "train.log_every": "log_every",
    "train.beta": "beta", "train.checkpoint_every": "checkpoint_every", "train.warmup": "warmup",
    "train.warmup_start": "warmup_start", "train.freeze_model": "freeze_model", "train.average": "average",
    "optim.lr": "lr", "optim.lr_final": "lr_final", "optim.schedule": "schedule", "optim.betas": "adam_betas",
    "objective.noise": "noise", "objective.closed_form": "closed_form", "objective.free_bits": "free_bits",
    "objective.K": "K",
    **{f"{group}.{key}": key for group in ("model", "guide")
       for key in ("latent_dim", "hidden", "layers", "prior_hidden", "prior_layers", "upper_hidden", "upper_layers",
                   "activation", "min_scale")},
    "model.depth": "depth", "model.gain": "gain", "model.prior_gain": "prior_gain",
    "model.prior_gain_rate": "prior_gain_rate", "model.prior_gain_floor": "prior_gain_floor",
}
CONFIG_RULES = {key: RULES[name] for key, name in CONFIG_KEYS.items()}


def allowed(name: str) -> str:
    """What argument `name` may be, in words."""
    return RULES[name][1]


def is_allowed(name: str, value) -> bool:
    test = RULES[name][0]
    try:
        return bool(test(value))
    except (TypeError, ValueError):
        return False


def check(name: str, value, label: str = None) -> None:
    """Raise ValueError (one line, naming `label` or `name`, the value and what is allowed) unless RULES[name]
    allows value. label: the name to print, e.g. a config key such as 'optim.lr'."""
    if not is_allowed(name, value):
        label = label or name
        raise ValueError(f"{label}={value!r} is not allowed: {label} must be {RULES[name][1]}")


def check_all(**values) -> None:
    """check(name, value) for every keyword argument."""
    for name, value in values.items():
        check(name, value)


__all__ = ["RULES", "CONFIG_KEYS", "CONFIG_RULES", "check", "check_all", "allowed", "is_allowed", "is_int",
           "is_number", "is_finite", "SCHEDULES", "NOISE", "ACTIVATIONS", "INITS",
           "ENGINES"]
