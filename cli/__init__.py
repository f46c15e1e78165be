"""The command line's contract, kept apart from run.py's training and evaluation.

* Before Hydra creates anything, `preflight` composes the config and checks every override: unknown keys (with or
  without '+') are refused naming the closest known keys; in a single run every value is validated, a resumed
  checkpoint is checked against the config, and the output directory is claimed (a refused run leaves no trace).
* Each run claims its own directory (analysis.rundir) and records how it ended in status.json.
* A multirun is checked before any job runs: its jobs' directories must be creatable (no file in their place, no
  name longer than the filesystem allows), no two jobs may train the same seed (seed and replicas), and the sweep
  directory is claimed for this sweep alone (an exclusive lock held until the process ends: a second sweep into it
  is refused; a lock dies with its process, so a killed sweep never blocks a re-run).
* Exit codes: 0 ok; 2 bad input, divergence or an OS error (one line on stderr); 1 a crash, or a multirun with a
  failed job (one line per failed job at the end); 128 + the signal (130 SIGINT, 143 SIGTERM) for a run or sweep
  interrupted, after its jobs' status says killed and the sweep summary is written.
"""
import difflib
import itertools
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from infer.validate import CONFIG_RULES, MAX_SEED, is_finite, is_int

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("data", "model", "guide", "objective", "optim", "experiment", "pair")
REQUIRED_GROUPS = ("data", "model", "guide", "objective", "optim")  # a run needs one option of each
# keys the config groups set themselves: what a group's option instantiates, and its name (the run dir's, metrics')
RESERVED = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")
# Hydra's own flags that print or change how Hydra runs; with these the preflight is skipped
HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--package", "-p",
               "--shell-completion", "-sc", "--version", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun")
# keys that decide a training trajectory: a resume must not change them (train.steps may grow)
TRAJECTORY = ("data", "model", "guide", "objective", "optim", "seed", "train.num_particles", "train.beta",
              "train.warmup", "train.warmup_start", "train.average")
# peak memory of a training step, measured (vae, n = 3e5 and 1e6, 32 particles: 0.85 and 2.05 GB peak RSS):
MEMORY_BASE = 256 * 2**20  # the interpreter, torch and pyro
MEMORY_PER_PARAM = 16  # a param, its grad and Adam's two moments, float32
MEMORY_PER_PARTICLE_BIT = 20  # bytes per (particle x data point x bit): logits, log-probs and their grads
# keys that decide what history.csv means: a resume must not change them (its rows would mix windows)
HISTORY = ("train.log_every",)
SWEEP_LOCK = ".sweep.lock"
log = logging.getLogger("onebit")
STATE = {"exit": 0, "claim": None, "signal": None, "sweep_lock": None}


class ConfigError(ValueError):
    """A config value or key outside what is allowed; its message names the key."""


def _bool(v) -> bool:
    return isinstance(v, bool)


# The allowed values of every config key: the library's own table (infer.validate: the bounds fit, the models and
# the objectives check again when called from Python), plus the keys only the command line has.
COMMAND_LINE_RULES = {
    # a run needs a seed (it names the run dir, and replicas train seed .. seed + replicas - 1) and a thread count
    "seed": (lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    "threads": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "overwrite": (_bool, "true or false"),
    "replicas": (lambda v: is_int(v) and v >= 1,
                 "an integer >= 1 (seeds seed .. seed + replicas - 1, trained together)"),
    "memory_gb": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "train.num_particles": (lambda v: is_int(v) and v >= 2, "an integer >= 2 (the lattice and RQMC noise need two)"),
    "train.progress": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "train.resume": (lambda v: v is None or (isinstance(v, str) and v != ""), "null or a path to a checkpoint.pt"),
    "eval.samples": (lambda v: is_int(v) and v >= 10000, "an integer >= 10000 (final numbers need 10^4 draws)"),
    "eval.replicates": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "eval.tol": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "eval.iwae_k": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "eval.noise": (lambda v: v in ("mc", "qmc", "lattice"), "mc, qmc or lattice"),
    "eval.figures": (_bool, "true or false"),
    "guide.components": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "guide.flows": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "guide.count_bins": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "guide.bound": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
    "guide.order": (lambda v: v in ("linear", "quadratic"), "linear or quadratic"),
    "guide.gain": (_bool, "true or false"),
    "objective.nodes": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "objective.inner_nodes": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "objective.steps.vae": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "objective.steps.dlgm": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "device": (lambda v: isinstance(v, str) and (v == "cpu" or v.startswith("cuda")), "cpu or cuda[:index]"),
}
RULES = {**CONFIG_RULES, **COMMAND_LINE_RULES}


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is not allowed."""
    for key, (test, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if isinstance(value, str) and value == "<absent>":
            continue
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        try:
            ok = test(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key}={value!r} is not allowed: {key} must be {allowed}")
    from infer.validate import check_samples

    try:
        check_samples(cfg.eval.samples, cfg.eval.replicates)
    except ValueError as err:
        raise ConfigError(f"eval.{err}".replace("with replicates=", "with eval.replicates=")) from None
    replicas = cfg.get("replicas", 1)
    if cfg.seed + replicas - 1 > MAX_SEED:
        raise ConfigError(f"seed={cfg.seed} is not allowed with replicas={replicas}: replicas train the seeds seed .. "
                          f"seed + replicas - 1, and seeds must be <= {MAX_SEED}: seed must be <= "
                          f"{MAX_SEED - replicas + 1}")
    check_device(cfg.device)
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
    if index and (not index.isdigit() or int(index) >= count):
        raise ConfigError(f"device={device!r} is not available: this machine has {count} CUDA device(s); device "
                          f"must be cpu or cuda:0 .. cuda:{count - 1}")


# ---------------------------------------------------------------------------------------------------------------
# keys


def group_options(group: str) -> list:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_group_choices(argv) -> None:
    """Refuse `group=option` overrides whose option has no yaml in conf/<group>/, before Hydra composes."""
    chosen = {}
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = key.split("@")[0]
        if group not in GROUPS:
            continue
        options = group_options(group)
        if group in REQUIRED_GROUPS and (arg.startswith("~") or value.strip() in ("null", "")):
            raise ConfigError(f"{arg}: {group} needs an option: {group} must be one of {', '.join(options)}")
        if not sep:
            continue
        chosen[group] = value
        for choice in value.split(","):
            if choice and choice != "null" and choice not in options:
                raise ConfigError(f"{group}={choice} is not allowed: {group} must be one of {', '.join(options)}")
    pair = chosen.get("pair")
    if pair and pair != "null" and "," not in pair:
        picks = pair_choices(pair)
        for group in ("model", "guide"):
            if group in chosen and chosen[group] != picks.get(group):
                raise ConfigError(f"pair={pair} chooses model={picks.get('model')} guide={picks.get('guide')}, "
                                  f"which {group}={chosen[group]} contradicts: give pair or model/guide, not both")


def pair_choices(pair: str) -> dict:
    """{'model': option, 'guide': option} that conf/pair/<pair>.yaml chooses (its `override /group: option`)."""
    node = OmegaConf.to_container(OmegaConf.load(CONF / "pair" / f"{pair}.yaml"))
    out = {}
    for entry in (node or {}).get("defaults", []):
        if isinstance(entry, dict):
            for k, v in entry.items():
                out[k.replace("override", "").strip().strip("/")] = v
    return out


def leaf_keys(node, prefix="") -> list:
    """Every key path of a (container) config: 'train', 'train.steps', ..."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            out.append(path)
            out += leaf_keys(v, path + ".")
    return out


_ABSENT = object()


def has_key(cfg: dict, key: str) -> bool:
    """Whether a dotted key path exists in a container config (its value may be None)."""
    from analysis.sweep import select

    return select(cfg, key, _ABSENT) is not _ABSENT


def suggest(key: str, known: list) -> str:
    """', did you mean a, b?' from the known leaf keys closest to key (by path, or by its last part)."""
    last = key.split(".")[-1]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    close += [k for k in known if k.split(".")[-1] == last and k not in close]
    close += [k for k in known if k not in close and difflib.get_close_matches(last, [k.split(".")[-1]], cutoff=0.75)]
    return f"; did you mean {', '.join(close[:4])}?" if close else ""


def other_options_with(key: str) -> list:
    """'group=option' for every option of key's group whose yaml has key (e.g. model.depth -> ['model=dlgm'])."""
    group, _, rest = key.partition(".")
    if group not in GROUPS or not rest:
        return []
    found = []
    for option in group_options(group):
        node = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
        node = node.get(group, node) if isinstance(node, dict) else {}
        if has_key(node, rest):
            found.append(f"{group}={option}")
    return found


def _compose(overrides, hydra_cfg=False):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def _one_line(err) -> str:
    text = " ".join(str(err).split())
    return text.replace("To append to your config use +", "(no '+' either: ") if "+" in text else text


def _parse(overrides):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # noqa: BLE001  hydra's OverrideParseException
        raise ConfigError(f"cannot parse the command line: {_one_line(err)}") from None


def check_keys(overrides, multirun: bool) -> None:
    """Refuse, in one line, every override that names no key of the composed config (with or without '+'), a '+'
    on a key that exists, a deletion, and a sweep outside -m. Group choices that sweep are composed each."""
    parsed = _parse(overrides)
    groups, plain = {}, []
    for o in parsed:
        key = o.get_key_element().lstrip("+~")
        if not o.key_or_group:
            raise ConfigError(f"{o.input_line!r} is not an override: an override is key=value (e.g. data.n=5)")
        if key.startswith("hydra") or o.key_or_group.startswith("hydra"):
            continue
        last, group = o.key_or_group.split(".")[-1], o.key_or_group.split(".")[0]
        if last in RESERVED or (last == "name" and group in GROUPS and o.key_or_group.count(".") == 1):
            what = (f"a group option's name: choose another option instead ({group}=<one of "
                    f"{', '.join(group_options(group))}>)" if last == "name"
                    else "set by the config group's option (conf/): choose another option instead")
            raise ConfigError(f"{o.key_or_group} cannot be overridden: it is {what}")
        if o.key_or_group.split("@")[0] in GROUPS:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            groups[("+" if o.is_add() else "") + o.key_or_group] = values
            continue
        if o.is_sweep_override() and not multirun:
            raise ConfigError(f"{o.input_line} sweeps {o.key_or_group} over several values; add -m to run a multirun")
        plain.append(o)
    combos = [dict(zip(groups, vs)) for vs in itertools.product(*groups.values())] or [{}]
    for combo in combos[:64]:
        base_overrides = [f"{k}={v}" for k, v in combo.items()]
        try:
            base = OmegaConf.to_container(_compose(base_overrides, hydra_cfg=True))
        except Exception as err:  # noqa: BLE001  hydra's composition errors
            raise ConfigError(f"cannot compose the config: {_one_line(err)}") from None
        sweep = (base.get("hydra", {}).get("sweeper", {}) or {}).get("params") or {}
        base.pop("hydra", None)
        known = [k for k in leaf_keys(base) if not isinstance(OmegaConf.select(OmegaConf.create(base), k), DictConfig)]
        where = " for " + ", ".join(f"{k.lstrip('+')}={v}" for k, v in combo.items()) if combo else ""
        for o in plain:
            key = o.key_or_group
            if o.is_delete():
                raise ConfigError(f"~{key}: deleting config keys is not allowed; set {key} to a value instead")
            if not has_key(base, key):
                elsewhere = other_options_with(key)
                hint = f"; it is a key of {', '.join(elsewhere)}" if elsewhere else suggest(key, known)
                raise ConfigError(f"{key} is not a config key{where}{hint}")
            if (o.is_add() and not o.is_force_add()) and has_key(base, key):
                raise ConfigError(f"+{key}: {key} already exists; override it without '+': {key}=...")
        given = {k.lstrip("+") for k in groups} | {o.key_or_group for o in plain}
        unset = [k for k in sweep if k not in given]  # a single run may set every swept key itself (a replica's)
        if unset and not multirun:
            raise ConfigError(f"{where.replace(' for ', '', 1) or 'the config'} sweeps {', '.join(unset)}: add -m to "
                              f"run its sweep (python run.py -m ...), or set {', '.join(unset)} for a single run")
        for key in sweep:  # an experiment's own sweep keys
            if key.split("@")[0] not in GROUPS and not key.startswith("hydra") and not has_key(base, key):
                raise ConfigError(f"{key} (swept by the experiment) is not a config key{suggest(key, known)}")


# ---------------------------------------------------------------------------------------------------------------
# preflight and the run directory


def _quote(path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def preflight(overrides, multirun: bool) -> list:
    """Check the command line before Hydra runs; return the overrides that pin the output dir it resolved.
    A single run is validated in full and its directory claimed here, so a refused run creates nothing."""
    check_group_choices(overrides)
    check_keys(overrides, multirun)
    if multirun:
        composed = [_first_values(overrides)]
    else:
        composed = [list(overrides)]
    try:
        cfg = _compose(composed[0], hydra_cfg=True)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot compose the config: {_one_line(err)}") from None
    if multirun:
        sweep_dir = Path(str(cfg.hydra.sweep.dir)).absolute()
        jobs = sweep_jobs(overrides, cfg)
        if jobs is not None:
            check_seed_overlap(jobs, cfg)
            check_job_dirs(jobs, cfg, sweep_dir)
        claim_sweep(sweep_dir, bool(cfg.get("overwrite", False)))
        STATE["sweep_dir"] = sweep_dir
        return [f"hydra.sweep.dir={_quote(sweep_dir)}"]
    validate(cfg)
    load_resume(cfg)
    from analysis.rundir import check_run_dir_setting

    check_run_dir_setting(OmegaConf.select(cfg, "hydra.run.dir"))
    out = Path(str(cfg.hydra.run.dir)).absolute()
    STATE["claim"] = claim_for(cfg, out)
    return [f"hydra.run.dir={_quote(out)}"]


def _first_values(overrides) -> list:
    """The overrides with every sweep replaced by its first value (enough to resolve the sweep dir)."""
    out = []
    for o in _parse(overrides):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None) if o.is_discrete_sweep() else None
            if first is None:
                continue
            out.append(f"{'+' if o.is_add() else ''}{o.key_or_group}={first}")
        else:
            out.append(o.input_line)
    return out


def sweep_jobs(overrides, cfg):
    """Every job of the sweep, as the overrides Hydra's basic sweeper gives it (the config's hydra.sweeper.params,
    then the command line, which wins), in Hydra's order (job number i is item i); None for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    if "BasicSweeper" not in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")):
        return None
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    try:
        return BasicSweeper.split_arguments(_parse(args), None)[0]
    except Exception:  # noqa: BLE001  a sweep the basic sweeper refuses: Hydra says so itself
        return None


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


def _job_subdir(job, num: int, cfg) -> str:
    """The job directory name Hydra will give job number num (hydra.sweep.subdir, resolved as Hydra does)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.hydra_config import HydraConfig

    od = cfg.hydra.job.config.override_dirname
    parsed = [o for o in _parse(job) if not o.is_hydra_override()]
    name = get_overrides_dirname(parsed, exclude_keys=list(od.exclude_keys), item_sep=od.item_sep,
                                 kv_sep=od.kv_sep)
    raw = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir")
    if raw == "${hydra:job.override_dirname}":
        return name
    from omegaconf import read_write

    copy = _compose(job, hydra_cfg=True)  # the job's own config (a subdir may name any of its keys)
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
            subdir = _job_subdir(job, num, cfg)
        except Exception:  # noqa: BLE001  an exotic subdir: Hydra resolves it itself
            return
        path = sweep_dir / subdir
        what = " ".join(j for j in job if not j.lstrip("+~").startswith("hydra")) or "the job"
        what = what if len(what) <= 100 else what[:97] + "..."
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


def claim_sweep(sweep_dir: Path, overwrite: bool) -> None:
    """Claim sweep_dir for this sweep alone: an exclusive lock on <sweep_dir>/.sweep.lock, held until this process
    ends (the kernel drops it with the process, so a killed sweep leaves no stale claim). Raises RunDirError if
    another sweep holds it, or if it already holds a finished sweep (multirun.yaml) and overwrite is false; a
    refused claim removes what it created."""
    import fcntl

    from analysis.rundir import RunDirError

    created = [p for p in [sweep_dir, *sweep_dir.parents] if not p.exists()]
    lock = sweep_dir / SWEEP_LOCK
    new_lock = not lock.exists()

    def undo(fd):
        os.close(fd)
        if new_lock:
            lock.unlink(missing_ok=True)
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
        holder = lock.read_text().strip() if lock.is_file() else ""
        os.close(fd)
        raise RunDirError(f"sweep dir {sweep_dir} is in use by another sweep ({holder or 'still running'}); wait "
                          "for it to end, or choose another hydra.sweep.dir") from None
    if (sweep_dir / "multirun.yaml").exists() and not overwrite:
        undo(fd)
        raise RunDirError(f"sweep dir {sweep_dir} already holds a sweep; choose another hydra.sweep.dir, or "
                          "set overwrite=true")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, started {__import__('time').strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    STATE["sweep_lock"] = fd


def unclaimed_record(hc) -> Path:
    """Where a sweep job that could not claim its own directory is recorded."""
    return Path(str(hc.sweep.dir)).absolute() / "_refused" / f"job{hc.job.num}"


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


def record_unclaimed(cfg, hc, err) -> None:
    """A sweep job whose own directory could not be claimed (it holds another run, or cannot be written) is
    recorded in <sweep dir>/_refused/job<num>/ (its .hydra files and status.json = refused, with the reason), so
    that the sweep summary lists it; nothing is written into the directory it could not claim."""
    from analysis.rundir import Claim, RunDirError

    try:
        claim = Claim(unclaimed_record(hc), allow_existing=bool(cfg.get("overwrite", False)))
        save_hydra_files(claim, cfg, hc)
        claim.status("refused", f"its job dir could not be claimed: {' '.join(str(err).split())}")
    except (RunDirError, OSError):
        pass  # the sweep dir itself cannot be written: the line on stderr is all there is


def claim_for(cfg, out: Path, fresh: bool = False):
    """The Claim on `out` for this run: the one preflight made for a single run, or a new one (a sweep job: fresh,
    so that a job never takes over an earlier job's claim on the same dir; a run without the CLI).
    A directory holding a run is refused unless overwrite=true or the run resumes a checkpoint inside it."""
    from analysis.rundir import Claim

    held = STATE.get("claim")
    if not fresh and held is not None and Path(held.path) == Path(out).absolute():
        return held
    resume = OmegaConf.select(cfg, "train.resume")
    in_place = bool(resume) and Path(str(resume)).absolute().parent == Path(out).absolute()
    overwrite = bool(cfg.get("overwrite", False))
    claim = Claim(out, allow_existing=overwrite or in_place, replace=overwrite and not in_place,
                  key="hydra.sweep.dir" if fresh else "hydra.run.dir")
    STATE["claim"] = claim
    return claim


def save_hydra_files(claim, cfg, hc) -> None:
    """.hydra/config.yaml, overrides.yaml and hydra.yaml, as Hydra writes them (hydra.output_subdir is null so that
    Hydra itself writes nothing before the run's directory is claimed)."""
    folder = Path(claim.path) / ".hydra"
    folder.mkdir(exist_ok=True)
    claim.wrote(".hydra")
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), folder / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), folder / "overrides.yaml")


def replica_dir(path: Path, cfg) -> Path:
    """Create a replica's run directory (path, inside its job's) holding what its single run's .hydra/ holds:
    config.yaml (the replica's config: that of the single run, seed=<its seed>, replicas: 1), overrides.yaml (the
    job's, with seed=<its seed> replicas=1: `python run.py <them>` runs it alone) and hydra.yaml (the job's, with
    those overrides and this dir); marked running."""
    from hydra.core.hydra_config import HydraConfig

    from analysis.rundir import write_status

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
            copy.hydra.runtime.output_dir = str(Path(path).absolute())
        OmegaConf.save(copy, folder / "hydra.yaml")
    write_status(path, "running")
    return Path(path)


def fail(claim, status: str, err, multirun: bool, code: int = 2) -> float:
    """Record a run that did not end well: one line on stderr (and in run.log), status.json in a sweep job or
    after training, nothing left behind by a single run refused before training. Returns nan for sweepers."""
    line = " ".join(str(err).split())
    print(f"error: {line}", file=sys.stderr)
    if multirun and claim is not None:  # a sweep job's run.log says why it failed (not another run's log)
        log.error(line)
    if claim is not None:
        if status == "refused" and not multirun:
            claim.release()
        else:
            claim.status(status, line)
            log.info(f"outputs: {claim.path}")
    STATE["exit"] = max(STATE["exit"], code)
    return math.nan


# ---------------------------------------------------------------------------------------------------------------
# resume, memory, divergence


def trajectory_config(cfg) -> dict:
    """The part of the config that decides the training trajectory (saved in every checkpoint)."""
    out = {}
    for key in TRAJECTORY + HISTORY + ("train.steps",):
        value = OmegaConf.select(cfg, key)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_resume(cfg):
    """The checkpoint train.resume names, checked against this config: refused in one line if it changes anything
    that decides the trajectory (naming the keys), or if train.steps is below the checkpoint's step."""
    path = OmegaConf.select(cfg, "train.resume")
    if not path:
        return None
    from infer.checkpoint import load_checkpoint

    state = load_checkpoint(path, label="train.resume")
    saved = state.get("config")
    if saved is None:
        raise ConfigError(f"train.resume={path}: the checkpoint carries no config (written by an older version); "
                          "it cannot be checked, so it is not resumed")
    now, then = _flat(trajectory_config(cfg)), _flat(saved)
    differ = sorted(k for k in set(now) | set(then) if k != "train.steps" and now.get(k) != then.get(k))
    for group in ("model", "guide", "objective", "optim", "data"):  # another option of a group: name it once
        if f"{group}.name" in differ:
            differ = [f"{group}.name"] + [k for k in differ if not k.startswith(f"{group}.")]
    if differ:
        shown = ", ".join(f"{k} ({then.get(k)!r} -> {now.get(k)!r})" for k in differ[:5])
        raise ConfigError(f"train.resume={path} was written with other settings: {shown}"
                          + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
                          + "; resume with the checkpoint's settings")
    if cfg.train.steps < int(state["step"]):
        raise ConfigError(f"train.steps={cfg.train.steps} is below the checkpoint's step {state['step']}: "
                          f"train.steps must be >= {state['step']} to resume it")
    every = then.get("train.log_every", _log_every_of(state.get("history") or []))
    if every is not None and every != cfg.train.log_every:
        raise ConfigError(f"train.log_every={cfg.train.log_every} differs from the checkpoint's {every}: its history "
                          f"would mix windows of {every} and {cfg.train.log_every} steps; resume with "
                          f"train.log_every={every}")
    return state


def _log_every_of(history: list):
    """The logging window of a history written before checkpoints carried train.log_every: its first row's step,
    when a second row shows that the first window was a full one (None when it cannot be told)."""
    steps = [row.get("step") for row in history[:2]]
    return int(steps[0]) if len(steps) == 2 and None not in steps else None


def resume_note(cfg, state) -> dict:
    """What metrics.json says of a resumed run whose train.steps differs from the step budget its checkpoint was
    written with: {"resumed": {checkpoint, step, checkpoint_steps, schedule_changed}}, since the lr schedule is a
    function of the budget (the steps before ran on the old budget's schedule, those after on the new one's).
    {} otherwise: a resume with the same budget is the uninterrupted run, and its metrics.json is that run's."""
    if state is None:
        return {}
    then = (state.get("config") or {}).get("train.steps")
    if then is None or then == cfg.train.steps:
        return {}
    return {"resumed": {"checkpoint": str(OmegaConf.select(cfg, "train.resume")), "step": int(state["step"]),
                        "checkpoint_steps": then,
                        "schedule_changed": f"steps 1..{state['step']} followed the lr schedule of a {then}-step run, "
                                            f"the rest that of a {cfg.train.steps}-step run (optim.schedule="
                                            f"{cfg.optim.schedule}): not the trajectory of either uninterrupted run"}}


def network_params(cfg, build) -> int:
    """The number of params of the model and guide `build(cfg)` makes, without building them at cfg's data.n: every
    network's params are affine in n (its n-wide layers), so they are counted on networks built at n = 1 and
    n = 2 (a few kB) and extrapolated, exactly. Lazy guides (autonormal, autoiaf) count as their model alone."""
    import torch

    counts = []
    for n in (1, 2):
        small = OmegaConf.merge(cfg, {"data": {"n": n}})
        _, model, guide = build(small)
        counts.append(sum(p.numel() for m in (model, guide) if isinstance(m, torch.nn.Module)
                          for p in m.parameters()))
    return counts[0] + (counts[1] - counts[0]) * (int(cfg.data.n) - 1)


def check_memory(cfg, build) -> None:
    """Refuse, before any network is built at data.n, a run whose training step would need more than memory_gb
    (peak RSS): the base, the networks' params (network_params: their n-wide layers dominate) and the particles'
    n-wide tensors. Evaluation is chunked and stays below that peak. Raises ConfigError (one line)."""
    from infer.validate import memory_refusal
    from models import OneBit

    data = OneBit(cfg.data.n, tuple(cfg.data.weights))
    params = network_params(cfg, build)
    particles_key = "objective.K" if "K" in cfg.objective else "train.num_particles"
    particles = OmegaConf.select(cfg, particles_key)
    replicas = cfg.get("replicas", 1)
    if replicas > 1:  # every replica's own networks and their stacked copies; one stack's particles at a time
        from infer.fit_replicas import stack_size

        params, particles = 2 * replicas * params, stack_size(replicas, particles, data) * particles
    per_n = (MEMORY_PER_PARAM * params + MEMORY_PER_PARTICLE_BIT * particles * 2 * data.n) / data.n
    reason = memory_refusal(data.n, cfg.memory_gb, MEMORY_BASE, per_n, params, particles,
                            particles_key=particles_key)
    if reason:
        raise ConfigError(reason)


def divergence(result, data, beta: float = 1.0, final=None) -> str:
    """Why a run counts as diverged ('' if it does not): its objective is not finite, or it ends worse than the
    trivial solution, the collapsed code that ignores z (objective n H(w) at every beta: recon n H(w), KL 0), and
    worse than its own initial objective, by more than 1% + 0.01 nats. The objective is recon + beta KL; `final` is
    the evaluated (headline) metrics, else the last logged training window is used. (A short run that improved on
    its start but not yet on n H(w) is not diverged.)"""
    history = result.history
    if not history:
        return ""
    trivial = data.n * data.entropy
    if final is None:
        last = history[-1].get("objective", history[-1]["loss"])
    else:
        loss, kl = final.get("loss"), final.get("kl")
        kl_total = sum(kl.values()) if isinstance(kl, dict) else 0.0
        last = None if loss is None else loss + (beta - 1.0) * kl_total
    if last is None or not math.isfinite(last):
        return f"training diverged: the loss became {last} by step {history[-1]['step']}; lower optim.lr"
    start = getattr(result, "initial_loss", None)
    worst = max(trivial, start if start is not None and math.isfinite(start) else -math.inf)
    if last > worst + 0.01 * worst + 0.01:
        return (f"training diverged: the final objective {last:.4g} is above the no-latent loss n*H(w) = {trivial:.4g}"
                + (f" and the initial objective {start:.4g}" if start is not None else "")
                + ": the run learned less than a decoder that ignores z; lower optim.lr")
    return ""


def write_json(path, obj) -> None:
    from analysis.rundir import write_atomic

    write_atomic(path, json.dumps(obj, indent=2))


# ---------------------------------------------------------------------------------------------------------------
# the command line


def main(hydra_main, argv) -> int:
    """Run `hydra_main` (run.py's @hydra.main task) for argv after the preflight; return the exit code."""
    args = argv[1:]
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        check_flags(args)
        if any(a.split("=")[0] in HYDRA_FLAGS for a in args):  # Hydra prints (help, config, info): keys checked
            overrides = hydra_flag_overrides(args)
            check_group_choices(overrides)
            check_keys(overrides, multirun=True)
            hydra_main()
            return STATE["exit"]
        overrides = [a for a in args if not a.startswith("-")]
        pins = preflight(overrides, multirun)
    except ValueError as err:  # ConfigError, RunDirError, CheckpointError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    sys.argv = [argv[0]] + args + pins
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        hydra_main()
    except KeyboardInterrupt:
        return interrupted(multirun)
    except BaseException:  # Hydra's own exit (SystemExit) or a crash outside the task: no stale 'running' dir
        release_unstarted()
        raise
    if multirun:
        from analysis.callbacks import LAST

        failed = LAST.get("failed") or []
        for job, reason in failed:
            print(f"failed: {job}: {reason}", file=sys.stderr)
        return 1 if failed else STATE["exit"]
    return STATE["exit"]


RUN_FLAGS = ("-m", "--multirun", "-r", "--run")
FLAG_VALUES = {"--cfg": ("job", "hydra", "all"), "-c": ("job", "hydra", "all"),
               "--info": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath"),
               "-i": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")}
VALUE_FLAGS = ("--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
               "--experimental-rerun", "--shell-completion", "-sc")


def check_flags(args) -> None:
    """Refuse, in one line, a dash argument that is neither -m/--multirun nor one of Hydra's flags (argparse would
    print its usage and exit after the run dir was claimed), and --cfg without job, hydra or all."""
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        flag, _, value = arg.partition("=")
        if flag not in RUN_FLAGS + HYDRA_FLAGS:
            raise ConfigError(f"{arg} is not an option of run.py: its options are -m/--multirun and Hydra's own "
                              "(--help, --cfg job, --info, ...); settings are key=value overrides (e.g. data.n=5)")
        if flag in ("--cfg", "-c"):
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value not in FLAG_VALUES[flag]:
                raise ConfigError(f"{flag} {value}: {flag} must be followed by job, hydra or all")


def hydra_flag_overrides(args) -> list:
    """The key=value overrides of a command line that carries Hydra's flags (their own values left out)."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        flag = arg.partition("=")[0]
        if arg.startswith("-"):
            takes = flag in VALUE_FLAGS or (flag in FLAG_VALUES and "=" not in arg and i + 1 < len(args)
                                                and args[i + 1] in FLAG_VALUES[flag])
            skip = takes and "=" not in arg
            continue
        out.append(arg)
    return out


def release_unstarted() -> None:
    """Release the single run's claim (preflight's) if its status still says this process is running it: Hydra
    exited before the task recorded how the run ended (nothing of it is left behind)."""
    from analysis.rundir import read_status

    claim = STATE.get("claim")
    if claim is None:
        return
    status = read_status(claim.path)
    if status.get("status") == "running" and status.get("pid") == os.getpid():
        claim.release()


# ---------------------------------------------------------------------------------------------------------------
# interruption


def on_sigterm(signum, frame):
    """SIGTERM takes SIGINT's path: KeyboardInterrupt in the main thread, so a run records that it was killed and a
    sweep writes its summary at exit. A second SIGTERM ends the process at once."""
    STATE["signal"] = signum
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    STATE["workers"] = _children()
    for pid in STATE["workers"]:  # a sweep's workers (joblib) stop too, and record it, before joblib ends them
        with __import__("contextlib").suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _children() -> list:
    """The pids of this process's worker processes: its children (Linux /proc; [] elsewhere), less the resource
    trackers of multiprocessing and loky (they end by themselves when this process does)."""
    me, out = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != me:
                continue
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if b"resource_tracker" not in command:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_workers(grace: float = 10.0) -> list:
    """End the sweep's worker processes (the joblib launcher's): SIGTERM each (a worker's run records that it was
    killed), wait up to `grace` seconds, then SIGKILL those left. Returns their pids."""
    import time

    pids = _children()
    for pid in pids:
        with __import__("contextlib").suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with __import__("contextlib").suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for pid in pids:  # reap them (they are our children)
        with __import__("contextlib").suppress(OSError):
            os.waitpid(pid, os.WNOHANG)
    return pids


def mark_killed(sweep_dir: Path, pids, name: str) -> int:
    """Every run of this sweep (status.json 'running', written by this process or one of its workers `pids`) whose
    process is gone, or is this one, gets status failed: 'killed by <name>'. Returns how many."""
    from analysis.rundir import read_status, write_status

    count = 0
    for path in sorted(Path(sweep_dir).rglob("status.json")):
        status = read_status(path.parent)
        pid = status.get("pid")
        if status.get("status") != "running" or (pid != os.getpid() and pid not in pids) or (
                pid != os.getpid() and _alive(pid)):
            continue
        write_status(path.parent, "failed", killed_reason(name, path.parent))
        count += 1
    return count


def killed_reason(name: str, out) -> str:
    """status.json's reason for a run ended by a signal."""
    resumes = " (its checkpoint.pt resumes it)" if (Path(out) / "checkpoint.pt").exists() else ""
    return f"killed by {name} before it finished{resumes}"


def interrupted(multirun: bool) -> int:
    """After SIGINT or SIGTERM: stop the sweep's workers, mark its unfinished runs killed, say so in one line;
    the sweep summary is written at exit (analysis.callbacks.SweepSummary). Returns 128 + the signal."""
    signum = STATE["signal"] or signal.SIGINT
    name = signal.Signals(signum).name
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the summary be written
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    where = ""
    if multirun:
        sweep_dir = STATE["sweep_dir"]
        pids = set(stop_workers()) | set(STATE.get("workers") or [])
        mark_killed(sweep_dir, pids, name)
        where = (f"; its unfinished runs say 'killed by {name}' in status.json; the sweep summary is written to "
                 f"{sweep_dir}/summary.md")
    elif STATE.get("claim") is not None:
        where = f"; outputs so far in {STATE['claim'].path}"
    print(f"error: interrupted by {name}{where}", file=sys.stderr)
    return 128 + int(signum)
