"""The allowed value of every config key: validate refuses, in one line naming the key, the first value outside it.

The table is the library's own (infer.validate.CONFIG_RULES: the bounds fit, the models and the objectives check
again when called from Python), plus COMMAND_LINE_RULES, the keys only the command line has; validate then checks
what spans keys (eval.samples with eval.replicates, seed with replicas, what replicas can train) and the device.
"""
import re

from omegaconf import DictConfig, OmegaConf

from cli.state import ConfigError
from infer.validate import CONFIG_RULES, MAX_DRAWS, MAX_SEED, MAX_STEPS, MAX_THREADS, is_finite, is_int, range_note


def _bool(v) -> bool:
    return isinstance(v, bool)


# The allowed values of every config key: the library's own table (infer.validate: the bounds fit, the models and
# the objectives check again when called from Python), plus the keys only the command line has.
MAX_REPLICAS = 1000  # seeds per job: replicas=4294967295 hung building the list of seeds before the memory check
COMMAND_LINE_RULES = {
    # a run needs a seed (it names the run dir, and replicas train seed .. seed + replicas - 1) and a thread count
    "seed": (lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    "threads": (lambda v: is_int(v) and 1 <= v <= MAX_THREADS, f"an integer >= 1 and <= {MAX_THREADS}"),
    "overwrite": (_bool, "true or false"),
    "replicas": (lambda v: is_int(v) and 1 <= v <= MAX_REPLICAS,
                 f"an integer in [1, {MAX_REPLICAS}] (seeds seed .. seed + replicas - 1, trained together)"),
    "memory_gb": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "train.num_particles": (lambda v: is_int(v) and v >= 2, "an integer >= 2 (the lattice and RQMC noise need two)"),
    "train.progress": (lambda v: v == "auto" or _bool(v), "auto, true or false"),
    "train.resume": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""),
                     "null or a path to a checkpoint.pt"),
    "eval.samples": (lambda v: is_int(v) and 10000 <= v <= MAX_DRAWS,
                     f"an integer in [10000, {MAX_DRAWS}] (final numbers need 10^4 draws)"),
    "eval.noise": (lambda v: v in ("mc", "qmc", "lattice"), "mc, qmc or lattice"),
    "eval.figures": (_bool, "true or false"),
    "guide.components": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "guide.count_bins": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "guide.bound": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "guide.order": (lambda v: v in ("linear", "quadratic"), "linear or quadratic"),
    "guide.gain": (_bool, "true or false"),
    "objective.steps.vae": (lambda v: is_int(v) and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS}]"),
    "objective.steps.dlgm": (lambda v: is_int(v) and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS}]"),
    "device": (lambda v: isinstance(v, str) and re.fullmatch(r"cpu|cuda(:[0-9]+)?", v) is not None,
               "cpu or cuda[:index]"),
}
RULES = {**CONFIG_RULES, **COMMAND_LINE_RULES}
# the guides of conf/guide/ that infer.fit_replicas refuses (their modules hold more than nn.Linear and LogGain
# layers, or a random buffer per copy): refused by the command line before anything is built, naming guide and replicas
UNSTACKABLE_GUIDES = ("mixture", "autonormal", "autoiaf")


_ABSENT = "<absent>"


def _missing(node, prefix: str = "") -> list:
    """The dotted keys under node (hydra.* left out) whose value is '???', without resolving interpolations."""
    out = []
    for key in node.keys() if isinstance(node, DictConfig) else []:
        path = f"{prefix}{key}"
        if path == "hydra":
            continue
        if OmegaConf.is_missing(node, key):
            out.append(path)
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            out += _missing(child, path + ".")
    return out


def check_structure(cfg: DictConfig) -> None:
    """Raise ConfigError (one line, naming the key) for a value left mandatory-missing ('???': Hydra's marker; it
    would pass unchecked and fail mid-run) and for a group of keys replaced by one value (train=null, train=5:
    every key under it would be skipped as absent). hydra.* is Hydra's own."""
    missing = _missing(cfg)
    if missing:
        key = missing[0]
        group = any(k.startswith(key + ".") for k in RULES)
        rule = (f"{key} must be {RULES[key][1]}" if key in RULES else
                f"{key} is a group of keys: set them one by one" if group else f"set {key}=<value>")
        raise ConfigError(f"{key}=??? is not allowed: ??? marks a value that is missing; {rule}")
    for key in RULES:
        parts = key.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            node = OmegaConf.select(cfg, parent, default=_ABSENT)
            if isinstance(node, str) and node == _ABSENT:
                break
            if not isinstance(node, DictConfig):
                keys = sorted({k.split(".")[i] for k in RULES if k.startswith(parent + ".")})
                raise ConfigError(f"{parent}={node!r} is not allowed: {parent} is a group of keys ("
                                  f"{', '.join(f'{parent}.{k}' for k in keys[:4])}, ...); set those keys one by one, "
                                  f"e.g. {key}=...")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is not allowed (check_structure first)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        check_structure(cfg)
    except OmegaConfBaseException as err:  # a group set to an interpolation that resolves to nothing (train=${x})
        key = getattr(err, "full_key", None) or "the config"
        why = str(err).splitlines()[0].split(" full_key:")[0]
        raise ConfigError(f"{key} is not allowed as it is set: its interpolation does not resolve ({why})") from None
    for key, (test, allowed) in RULES.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT)
        except Exception as err:  # noqa: BLE001  omegaconf's errors of an interpolation that resolves to nothing
            raise unresolved(cfg, key, err, f"be {allowed}") from None
        if isinstance(value, str) and value == _ABSENT:
            continue
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        try:
            ok = test(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key}={value!r} is not allowed: {key} must be {allowed}{range_note(value, allowed)}")
    from infer.validate import check_decay, check_samples, check_warmup

    try:
        check_samples(cfg.eval.samples, cfg.eval.replicates)
    except ValueError as err:
        raise ConfigError(f"eval.{err}".replace("with replicates=", "with eval.replicates=")) from None
    try:
        check_decay(cfg.optim.lr, cfg.optim.lr_final, cfg.optim.schedule, prefix="optim.")
        check_warmup(cfg.train.warmup, cfg.train.warmup_start, prefix="train.")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    replicas = cfg.get("replicas", 1)
    if cfg.seed + replicas - 1 > MAX_SEED:
        raise ConfigError(f"seed={cfg.seed} is not allowed with replicas={replicas}: replicas train the seeds seed .. "
                          f"seed + replicas - 1, and seeds must be <= {MAX_SEED}: seed must be <= "
                          f"{MAX_SEED - replicas + 1}")
    if not str(OmegaConf.select(cfg, "hydra.launcher._target_", default="")).endswith("SlurmLauncher"):
        check_device(cfg.device)  # under submitit_slurm the jobs run on other nodes: each job checks its own
    if replicas > 1:  # what replicas can train (infer.fit_replicas): the closed-form ELBO on lattice or qmc noise
        if OmegaConf.select(cfg, "train.resume"):
            raise ConfigError(f"train.resume is not allowed with replicas={replicas}: resume one replica as a single "
                              "run (seed=<its seed> train.resume=<its dir>/checkpoint.pt)")
        if cfg.objective.name != "closed_form":
            raise ConfigError(f"replicas={replicas} is not allowed with objective={cfg.objective.name}: replicas train "
                              "the closed-form ELBO (objective=closed_form)")
        if OmegaConf.select(cfg, "objective.noise") not in ("lattice", "qmc"):
            raise ConfigError(f"replicas={replicas} is not allowed with objective.noise={cfg.objective.noise}: "
                              "replicas need noise drawn outside the model and guide (lattice or qmc)")
        if cfg.train.freeze_model:  # fit_replicas trains model and guide: the flag would be ignored, mislabelled
            raise ConfigError(f"train.freeze_model=true is not allowed with replicas={replicas}: replicas train the "
                              "model and the guide together; train each seed alone (replicas=1, e.g. -m seed=0,1,2)")
        if cfg.guide.name in UNSTACKABLE_GUIDES:
            raise ConfigError(f"replicas={replicas} is not allowed with guide={cfg.guide.name}: its networks cannot "
                              "take a replica dimension; replicas train the gaussian, structured, meanfield and flow "
                              "guides (or use replicas=1)")
    from cli.build import check_targets

    check_targets(cfg)


def unresolved(cfg, key: str, err: Exception, must: str) -> ConfigError:
    """The one-line refusal of key, whose interpolation does not resolve (err: omegaconf's error): its value as
    written, why, and what `key must <must>`."""
    head, _, last = key.rpartition(".")
    try:
        raw = (OmegaConf.select(cfg, head) if head else cfg)._get_node(last)._value()
    except Exception:  # noqa: BLE001  the interpolation sits higher up, in the group itself
        raw = "<an interpolation>"
    why = str(err).splitlines()[0].split(" full_key:")[0]
    return ConfigError(f"{key}={raw} is not allowed: its interpolation does not resolve ({why}); {key} must {must}")


def is_unresolvable(err: Exception) -> bool:
    """Whether err is omegaconf's word for an interpolation that names no key, or whose resolver failed
    (${oc.env:UNSET}); not one to a value that Hydra or a launcher fills in later (${hydra:job.id} before launch)."""
    from omegaconf.errors import (InterpolationKeyError, InterpolationResolutionError,
                                  InterpolationToMissingValueError, InterpolationValidationError)

    return isinstance(err, InterpolationKeyError) or (
        isinstance(err, InterpolationResolutionError)
        and not isinstance(err, (InterpolationValidationError, InterpolationToMissingValueError)))


def resolved(cfg, key: str, must: str):
    """cfg's value at key (a dotted path), resolved; ConfigError in one line (unresolved) where its interpolation
    names no key or its resolver fails."""
    try:
        return OmegaConf.select(cfg, key)
    except Exception as err:  # noqa: BLE001
        if is_unresolvable(err):
            raise unresolved(cfg, key, err, must) from None
        raise


def check_device(device: str) -> None:
    """Raise ConfigError (one line, naming device) unless the device exists on this machine: cpu, or cuda[:index]
    with CUDA available and index below the device count."""
    if device == "cpu":
        return
    import torch

    index = device.partition(":")[2]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"device={device!r} is not available: this machine has no CUDA device (torch "
                          f"{torch.__version__}); device must be cpu here")
    if index and int(index) >= count:  # the device rule lets digits alone follow 'cuda:'
        raise ConfigError(f"device={device!r} is not available: this machine has {count} CUDA device(s); device "
                          f"must be cpu or cuda:0 .. cuda:{count - 1}")

