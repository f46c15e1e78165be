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
import os
import re

SCHEDULES = ("exponential", "cosine", "constant")
NOISE = ("mc", "qmc", "lattice")
ACTIVATIONS = ("elu", "relu", "tanh", "silu", "softplus")
INITS = ("reset", "keep")
ENGINES = ("auto", "general")
MAX_SEED = 2 ** 32 - 1  # numpy's RNG (seeded with torch's and Python's by pyro.set_rng_seed) takes seeds below 2**32
MAX_THREADS = 1024  # torch's thread pool: 20000 threads aborted (libgomp: thread creation failed), 100000 segfaulted
ORDERS = ("linear", "quadratic")
MAX_STEPS = 10 ** 9  # a step budget beyond any run (weeks at 1 ms a step); tqdm's len() overflowed at 10**20
MAX_LAYERS = 100  # hidden layers of a network, or latent layers of a DLGM: far beyond the study's 2-3; a depth of 10**6
# hung the memory check, which builds the networks (on the meta device) layer by layer
MAX_DRAWS = 2 ** 24  # draws per data point of an evaluation (eval.samples, khat_samples, 2 x iwae_k): 1000x the
# default; 10**12 tried to allocate 8 TB after training
MAX_TOL = 1e-3  # nats: the quadrature's tolerance (eval.tol, evaluate's and exact's tol; default 1e-4) bounds the
# error of every number labelled [exact], printed to 4 decimals; the study's runs differ by 1e-3 between seeds, so a
# looser one would let the label hide differences it is read for (10.0 allowed an error of 10 nats)


INT64 = (-2 ** 63, 2 ** 63 - 1)  # torch's sizes and counts: a larger integer overflowed in torch.empty (a traceback)
FLOAT32_MAX = 3.4028234663852886e38  # the networks compute in float32: a larger value overflowed a parameter


def is_int(v) -> bool:
    """An integer (Python or numpy) within int64, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and INT64[0] <= v <= INT64[1]


def is_number(v) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_finite(v) -> bool:
    """A real number within float32's range (the networks' dtype), not a bool."""
    return is_number(v) and math.isfinite(v) and abs(v) <= FLOAT32_MAX


def range_note(value, allowed_text: str = "") -> str:
    """Why a number that its rule's words would allow is refused, as text to append to the refusal ('' otherwise):
    an integer above int64 where the rule has no upper bound ('an integer >= k'), a finite real beyond float32's range
    where the rule asks 'a finite number'."""
    unbounded = "integer >=" in allowed_text and "<=" not in allowed_text and "[" not in allowed_text
    if (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > INT64[1] and unbounded):
        return " (integers must lie within int64: at most 2**63 - 1)"
    if is_number(value) and math.isfinite(value) and abs(value) > FLOAT32_MAX and "finite number" in allowed_text:
        return f" (numbers must lie within float32's range, ±{FLOAT32_MAX:.4g}, in which the networks compute)"
    return ""


def _int_at_least(low):
    return lambda v: is_int(v) and v >= low


def _layers(low):
    return lambda v: is_int(v) and low <= v <= MAX_LAYERS


def _ordered(v) -> bool:
    """A sequence with an order (a list, tuple, tensor or array; a set's or dict's order is an accident)."""
    return not isinstance(v, (set, frozenset, dict, str, bytes)) and hasattr(v, "__getitem__")


def _pair(test):
    def check(v):
        try:
            return _ordered(v) and len(v) == 2 and all(test(b) for b in v)
        except TypeError:
            return False
    return check


KHAT_MIN_SAMPLES = 100  # PSIS fits its Pareto tail to the largest min(S/5, 3 sqrt(S)) weights: 20 at S = 100


WEIGHT_MIN = 1.1754943508222875e-38  # float32's smallest normal number: the data's weights are a float32 tensor, and a
# smaller weight became 0 there (data.weights=[1e-300, 1.0] trained one point while it said two)


def _weights(v) -> bool:
    try:
        return (_ordered(v) and len(v) == 2 and all(is_finite(w) and w >= WEIGHT_MIN for w in v)
                and abs(sum(v) - 1) <= 1e-9)
    except TypeError:
        return False


RULES = {
    # training (infer.fit)
    "steps": (lambda v: is_int(v) and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS}]"),
    "lr": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "lr_final": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "schedule": (lambda v: v in SCHEDULES, " or ".join(SCHEDULES)),
    "adam_betas": (_pair(lambda b: is_finite(b) and 0 <= b < 1), "two numbers in [0, 1)"),
    "beta": (lambda v: is_finite(v) and v >= 0, "a finite number >= 0"),
    "warmup": (_int_at_least(0), "an integer >= 0"),
    "warmup_start": (lambda v: is_finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "seed": (lambda v: v is None or (is_int(v) and 0 <= v <= MAX_SEED), f"an integer in [0, {MAX_SEED}] (or None)"),
    "log_every": (_int_at_least(1), "an integer >= 1"),
    "checkpoint_every": (_int_at_least(0), "an integer >= 0 (0: never)"),
    "threads": (lambda v: v is None or (is_int(v) and 1 <= v <= MAX_THREADS),
                f"an integer >= 1 and <= {MAX_THREADS} (or None: leave torch's setting)"),
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
    "weights": (_weights, "two positive finite numbers that sum to 1 (each >= 1.2e-38, float32's smallest normal "
                          "number)"),
    # networks (models, guides)
    "latent_dim": (_int_at_least(1), "an integer >= 1"),
    "depth": (_layers(2), f"an integer in [2, {MAX_LAYERS}]"),
    "hidden": (_int_at_least(1), "an integer >= 1"),
    "layers": (_layers(0), f"an integer in [0, {MAX_LAYERS}]"),
    "prior_hidden": (_int_at_least(1), "an integer >= 1"),
    "prior_layers": (_layers(0), f"an integer in [0, {MAX_LAYERS}]"),
    "upper_hidden": (_int_at_least(1), "an integer >= 1"),
    "upper_layers": (_layers(0), f"an integer in [0, {MAX_LAYERS}]"),
    "activation": (lambda v: v in ACTIVATIONS, ", ".join(ACTIVATIONS[:-1]) + " or " + ACTIVATIONS[-1]),
    "min_scale": (lambda v: is_finite(v) and 0 < v <= 1, "a number in (0, 1]: a floor on a Gaussian's scale, at most "
                  "the prior's unit scale (1e30 made the loss or the evidence overflow)"),
    "gain": (lambda v: isinstance(v, bool), "true or false"),
    "prior_gain": (lambda v: isinstance(v, bool), "true or false"),
    "gain_rate": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "prior_gain_rate": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "average": (lambda v: is_finite(v) and 0 <= v < 1, "a number in [0, 1): the fraction of the last steps whose "
                "iterates are averaged (0: none)"),
    "gain_floor": (lambda v: v is None or is_finite(v), "null (no floor) or a finite number (the lowest log-gain)"),
    # guides (the command line's guide.* keys allow the same)
    "components": (_int_at_least(1), "an integer >= 1"),
    "flows": (_layers(1), f"an integer in [1, {MAX_LAYERS}] (flow layers)"),
    "count_bins": (_int_at_least(2), "an integer >= 2"),
    "bound": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "order": (lambda v: v in ORDERS, " or ".join(ORDERS)),
    "spread": (lambda v: is_finite(v) and v >= 0, "a finite number >= 0"),
    # Pyro's autoguides (guide=autonormal, guide=autoiaf)
    "init_scale": (lambda v: is_finite(v) and v > 0, "a finite number > 0 (the initial scale of AutoNormal)"),
    "num_transforms": (_layers(1), f"an integer in [1, {MAX_LAYERS}] (AutoIAFNormal's flow layers)"),
    "hidden_dim": (lambda v: isinstance(v, (list, tuple)) and len(v) >= 1 and all(is_int(h) and h >= 1 for h in v),
                   "a non-empty list of integers >= 1, e.g. [32] (AutoIAFNormal's hidden layer widths)"),
    # a model's or guide's name: a label in metrics.json and in the run dir's name
    "label": (lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", v) is not None,
              "a name of letters, digits, '_' and '-' (it is part of the run dir's name; choose a model or guide "
              "by its group, model=... guide=..., not by renaming it)"),
    # evaluation (analysis.report.evaluate, analysis.exact, analysis.montecarlo, analysis.iwae, analysis.psis): the
    # bounds of the command line's eval.* keys, except eval.samples' floor of 10^4 (a policy for a run's final
    # numbers; in Python, samples must be a multiple of replicates, at least 2 per replicate: check_samples)
    "tol": (lambda v: is_finite(v) and 0 < v <= MAX_TOL,
            f"a number in (0, {MAX_TOL:g}] (nats: an [exact] number may be off by up to this)"),
    "replicates": (_int_at_least(2), "an integer >= 2"),
    "iwae_k": (lambda v: is_int(v) and 1 <= v <= MAX_DRAWS // 2, f"an integer in [1, {MAX_DRAWS // 2}]"),
    "exact": (lambda v: isinstance(v, bool), "true or false"),
    "eval_seed": (lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    "khat_samples": (lambda v: v is None or (is_int(v) and KHAT_MIN_SAMPLES <= v <= MAX_DRAWS),
                     f"an integer in [{KHAT_MIN_SAMPLES}, {MAX_DRAWS}] (or None: the default, "
                     "analysis.report.khat_draws)"),
    "points": (_int_at_least(2), "an integer >= 2"),
    "nll_samples": (_int_at_least(2), "an integer >= 2"),
    "chunk": (_int_at_least(1), "an integer >= 1"),
    # objective=exact's lattice (infer.marginal.MarginalLikelihood): nodes of the top latent, inner_nodes per node
    "nodes": (lambda v: is_int(v) and 2 <= v <= MAX_DRAWS, f"an integer in [2, {MAX_DRAWS}]"),
    "inner_nodes": (lambda v: is_int(v) and 1 <= v <= MAX_DRAWS, f"an integer in [1, {MAX_DRAWS}]"),
}
RULES["prior_gain_floor"] = RULES["gain_floor"]  # the DLGM's name for its prior nets' gain floor

# config key -> argument name (run.py's keys; the guide's network keys share the model's rules)
CONFIG_KEYS = {
    "eval.tol": "tol", "eval.replicates": "replicates", "eval.iwae_k": "iwae_k",
    "data.n": "n", "data.weights": "weights", "seed": "seed", "threads": "threads",
    "train.steps": "steps", "train.num_particles": "num_particles", "train.log_every": "log_every",
    "train.beta": "beta", "train.checkpoint_every": "checkpoint_every", "train.warmup": "warmup",
    "train.warmup_start": "warmup_start", "train.freeze_model": "freeze_model", "train.average": "average",
    "optim.lr": "lr", "optim.lr_final": "lr_final", "optim.schedule": "schedule", "optim.betas": "adam_betas",
    "objective.noise": "noise", "objective.closed_form": "closed_form", "objective.free_bits": "free_bits",
    "objective.K": "K", "objective.nodes": "nodes", "objective.inner_nodes": "inner_nodes",
    **{f"{group}.{key}": key for group in ("model", "guide")
       for key in ("latent_dim", "hidden", "layers", "prior_hidden", "prior_layers", "upper_hidden", "upper_layers",
                   "activation", "min_scale")},
    "model.depth": "depth", "model.gain": "gain", "model.prior_gain": "prior_gain",
    "model.prior_gain_rate": "prior_gain_rate", "model.prior_gain_floor": "prior_gain_floor",
    "model.name": "label", "guide.name": "label",
    **{f"guide.{key}": key for key in ("components", "flows", "count_bins", "bound", "order", "spread",
                                       "init_scale", "num_transforms", "hidden_dim")},
    "guide.gain": "gain",
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


def shown(value) -> str:
    """repr(value) where it is one short line (a path or string: up to 300 characters, so a checkpoint's path is named
    in full), else '<TypeName>' (a tensor's or an nn.Module's repr spans lines)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001  a repr that fails still names its type
        text = ""
    most = 300 if isinstance(value, (str, os.PathLike)) else 80
    return text if text and "\n" not in text and len(text) <= most else f"<{type(value).__name__}>"


def refuse(label: str, value, allowed_text: str) -> ValueError:
    """The project's one-line ValueError: `<label>=<value> is not allowed: <allowed_text>` (value as `shown`)."""
    return ValueError(f"{label}={shown(value)} is not allowed: {allowed_text}{range_note(value, allowed_text)}")


def check(name: str, value, label: str = None) -> None:
    """Raise ValueError (one line, naming `label` or `name`, the value and what is allowed) unless RULES[name]
    allows value. label: the name to print, e.g. a config key such as 'optim.lr'."""
    if not is_allowed(name, value):
        label = label or name
        raise refuse(label, value, f"{label} must be {RULES[name][1]}")


def check_samples(samples, replicates) -> None:
    """Raise ValueError (one line, naming both) unless replicates is an integer >= 2 and samples an integer
    multiple of it with at least 2 draws per replicate (a replicate's draws are samples // replicates: a remainder
    would be dropped silently)."""
    check("replicates", replicates)
    if is_int(samples) and samples > MAX_DRAWS:
        raise ValueError(f"samples={samples} is not allowed: samples must be at most {MAX_DRAWS} (draws per data "
                         "point)")
    if not (is_int(samples) and samples >= 2 * replicates and samples % replicates == 0):
        raise ValueError(f"samples={shown(samples)} is not allowed with replicates={replicates}: samples must be an "
                         f"integer multiple of replicates, at least 2 x replicates = {2 * replicates} (e.g. "
                         f"{max(2, -(-samples // replicates) if is_int(samples) else 2) * replicates})")


def check_decay(lr, lr_final, schedule, prefix: str = "") -> None:
    """Raise ValueError (one line, naming both) where a decaying schedule (every one but constant) would raise the
    learning rate: lr_final above lr. prefix: the keys' config group, 'optim.' on the command line."""
    if schedule != "constant" and lr_final > lr:
        raise ValueError(f"{prefix}lr_final={lr_final!r} is not allowed with {prefix}lr={lr!r}: the {schedule} "
                         f"schedule decays the learning rate from {prefix}lr to {prefix}lr_final, so {prefix}lr_final "
                         f"must be <= {prefix}lr (or {prefix}schedule=constant)")


def check_warmup(warmup, warmup_start, prefix: str = "") -> None:
    """Raise ValueError (one line, naming both) where warmup_start would be ignored: a start other than 0 without a
    warm-up (warmup=0), whose KL weight is beta from the first step (the run said warmup_start=0.5 and did none).
    prefix: the keys' config group, 'train.' on the command line."""
    if warmup == 0 and warmup_start != 0:
        raise ValueError(f"{prefix}warmup_start={warmup_start!r} is not allowed with {prefix}warmup=0: the KL weight "
                         f"rises from {prefix}warmup_start x beta to beta over {prefix}warmup steps, and without a "
                         f"warm-up it is beta from the first step, so {prefix}warmup_start would be ignored: set "
                         f"{prefix}warmup to a number of steps, or leave {prefix}warmup_start at 0")


def check_model_argument(model, role: str = "model", needs=("n",)) -> None:
    """Raise ValueError (one line) unless `model` is a built model with the attributes `needs` (e.g. n, latent_dim,
    latent_sites): what a guide constructor reads from the model it serves. role: the argument's name."""
    lacks = [a for a in needs if not hasattr(model, a)]
    if model is None or isinstance(model, (str, bytes, numbers.Number, type)) or lacks or (
            "n" in needs and not is_int(getattr(model, "n", None))):
        raise refuse(role, model, f"{role} must be a built model (e.g. models.VAE(n) or models.DLGM(n)) with "
                                  f"{', '.join(needs)}")


def env_threads(environ=None) -> int:
    """The torch thread count importing the package sets: the environment variable ONEBIT_THREADS (default 1), an
    integer in [1, MAX_THREADS]; ValueError in one line naming the variable otherwise (int() failed at import, and
    99999 segfaulted after a run's dir was made)."""
    raw = (os.environ if environ is None else environ).get("ONEBIT_THREADS", "1")
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or not 1 <= value <= MAX_THREADS:
        raise ValueError(f"ONEBIT_THREADS={raw!r} is not allowed: the environment variable ONEBIT_THREADS (torch's "
                         f"thread count, set when the package is imported) must be an integer >= 1 and <= "
                         f"{MAX_THREADS}, or unset (1)")
    return value


def check_all(**values) -> None:
    """check(name, value) for every keyword argument."""
    for name, value in values.items():
        check(name, value)


__all__ = ["RULES", "CONFIG_KEYS", "CONFIG_RULES", "check", "check_all", "check_samples", "check_warmup",
           "check_model_argument", "refuse", "shown", "MAX_TOL",
           "MAX_SEED", "MAX_THREADS", "MAX_STEPS", "MAX_LAYERS", "MAX_DRAWS",
           "KHAT_MIN_SAMPLES", "ORDERS",
           "allowed",
           "is_allowed", "is_int", "is_number", "is_finite", "range_note", "INT64", "FLOAT32_MAX", "SCHEDULES", "NOISE",
           "ACTIVATIONS", "INITS", "ENGINES", "env_threads"]
