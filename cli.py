"""The command line's contract, kept apart from run.py's training and evaluation.

* Before Hydra creates anything, `preflight` composes the config and checks every override: unknown keys (with or
  without '+') are refused naming the closest known keys; in a single run every value is validated, a resumed
  checkpoint is checked against the config, and the output directory is claimed (a refused run leaves no trace).
* Each run claims its own directory (analysis.rundir) and records how it ended in status.json.
* Exit codes: 0 ok; 2 bad input, divergence or an OS error (one line on stderr); 1 a crash, or a multirun with a
  failed job (one line per failed job at the end).
"""
import difflib
import itertools
import json
import logging
import math
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from infer.validate import CONFIG_RULES, is_finite, is_int

CONF = Path(__file__).resolve().parent / "conf"
GROUPS = ("data", "model", "guide", "objective", "optim", "experiment", "pair")
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
log = logging.getLogger("onebit")
STATE = {"exit": 0, "claim": None}


class ConfigError(ValueError):
    """A config value or key outside what is allowed; its message names the key."""


def _bool(v) -> bool:
    return isinstance(v, bool)


# The allowed values of every config key: the library's own table (infer.validate: the bounds fit, the models and
# the objectives check again when called from Python), plus the keys only the command line has.
COMMAND_LINE_RULES = {
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
    replicas = cfg.get("replicas", 1)
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


# ---------------------------------------------------------------------------------------------------------------
# keys


def group_options(group: str) -> list:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_group_choices(argv) -> None:
    """Refuse `group=option` overrides whose option has no yaml in conf/<group>/, before Hydra composes."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = key.split("@")[0]
        if not sep or group not in GROUPS:
            continue
        options = group_options(group)
        for choice in value.split(","):
            if choice and choice != "null" and choice not in options:
                raise ConfigError(f"{group}={choice} is not allowed: {group} must be one of {', '.join(options)}")


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
        if key.startswith("hydra") or o.key_or_group.startswith("hydra"):
            continue
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
        from analysis.rundir import RunDirError

        sweep_dir = Path(str(cfg.hydra.sweep.dir)).absolute()
        if (sweep_dir / "multirun.yaml").exists() and not cfg.get("overwrite", False):
            raise RunDirError(f"sweep dir {sweep_dir} already holds a sweep; choose another hydra.sweep.dir, or "
                              "set overwrite=true")
        return [f"hydra.sweep.dir={_quote(sweep_dir)}"]
    validate(cfg)
    load_resume(cfg)
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


def claim_for(cfg, out: Path):
    """The Claim on `out` for this run: the one preflight made, or a new one (a sweep job, a run without the CLI).
    A directory holding a run is refused unless overwrite=true or the run resumes a checkpoint inside it."""
    from analysis.rundir import OUTPUTS, Claim, read_status

    held = STATE.get("claim")
    if held is not None and Path(held.path) == Path(out).absolute():
        return held
    resume = OmegaConf.select(cfg, "train.resume")
    in_place = bool(resume) and Path(str(resume)).absolute().parent == Path(out).absolute()
    replicas = read_status(out).get("replicas", []) if Path(out).is_dir() else []
    claim = Claim(out, allow_existing=bool(cfg.get("overwrite", False)) or in_place)
    if cfg.get("overwrite", False) and not in_place:  # replace: the old run's outputs go, nothing is mixed
        import shutil

        for name in list(OUTPUTS[1:]) + [p.name for p in Path(out).glob("*.png")] + ["traceback.txt"]:
            (Path(out) / name).unlink(missing_ok=True)
        shutil.rmtree(Path(out) / ".hydra", ignore_errors=True)
        for name in replicas:  # the replica runs of a job that trained several seeds
            shutil.rmtree(Path(out) / name, ignore_errors=True)
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
    """Create a replica's run directory (path, inside its job's) holding .hydra/config.yaml (the replica's config:
    that of the single run with its seed) and overrides.yaml (the job's, with seed=<its seed>), marked running."""
    from hydra.core.hydra_config import HydraConfig

    from analysis.rundir import write_status

    folder = Path(path) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    try:
        task = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("seed=")]
    except ValueError:  # run.run called without Hydra's app (a test, a notebook)
        task = []
    OmegaConf.save(OmegaConf.create(task + [f"seed={cfg.seed}"]), folder / "overrides.yaml")
    write_status(path, "running")
    return Path(path)


def fail(claim, status: str, err, multirun: bool, code: int = 2) -> float:
    """Record a run that did not end well: one line on stderr (and in run.log), status.json in a sweep job or
    after training, nothing left behind by a single run refused before training. Returns nan for sweepers."""
    line = " ".join(str(err).split())
    print(f"error: {line}", file=sys.stderr)
    if multirun:  # a sweep job's run.log says why it failed
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
    for key in TRAJECTORY + ("train.steps",):
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

    state = load_checkpoint(path)
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
    return state


def check_memory(cfg, data, model, guide) -> None:
    """Refuse, before training, a run whose training step would need more than memory_gb (peak RSS): the base, the
    networks' params (their n-wide layers dominate) and the particles' n-wide tensors. Evaluation is chunked and
    stays below that peak."""
    import torch

    params = sum(p.numel() for m in (model, guide) if isinstance(m, torch.nn.Module) for p in m.parameters())
    particles = cfg.objective.K if "K" in cfg.objective else cfg.train.num_particles
    replicas = cfg.get("replicas", 1)
    if replicas > 1:  # every replica's own networks and their stacked copies; one stack's particles at a time
        from infer.fit_replicas import stack_size

        params, particles = 2 * replicas * params, stack_size(replicas, particles, data) * particles
    per_n = (MEMORY_PER_PARAM * params + MEMORY_PER_PARTICLE_BIT * particles * 2 * data.n) / data.n
    need, budget = MEMORY_BASE + per_n * data.n, cfg.memory_gb * 2**30
    if need > budget:
        fits = int((budget - MEMORY_BASE) / per_n)
        raise ConfigError(f"data.n={data.n} needs about {need / 2**30:.1f} GB to train ({params:,} params, "
                          f"{particles} particles); memory_gb={cfg.memory_gb} fits data.n <= {fits:,} with these "
                          "settings: lower data.n or train.num_particles, or raise memory_gb")


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
    if any(a.split("=")[0] in HYDRA_FLAGS for a in args):
        hydra_main()
        return STATE["exit"]
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    try:
        pins = preflight(overrides, multirun)
    except ValueError as err:  # ConfigError, RunDirError, CheckpointError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    sys.argv = [argv[0]] + args + pins
    hydra_main()
    if multirun:
        from analysis.callbacks import LAST

        failed = LAST.get("failed") or []
        for job, reason in failed:
            print(f"failed: {job}: {reason}", file=sys.stderr)
        return 1 if failed else STATE["exit"]
    return STATE["exit"]
