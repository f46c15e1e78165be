"""What a run writes into its directory: status.json, metrics.json (headed by `describe` where no config heads it),
history.csv, checkpoint.pt, encodings.nc and the figures. write_run (analysis.report re-exports it) claims the
directory and writes them; write_outputs writes them into a directory its caller claimed (run.py's jobs)."""
import functools
import json
import logging
from pathlib import Path

import pandas as pd

from infer.checkpoint import save_checkpoint

from .rundir import write_atomic

log = logging.getLogger("onebit")


@functools.lru_cache(maxsize=None)
def config_names() -> dict:
    """{class: its name on the command line} of the models and guides conf/model/*.yaml and conf/guide/*.yaml
    build (their _target_ and name), read once; {} where the conf folder or a target cannot be read."""
    import importlib

    import yaml

    names = {}
    conf = Path(__file__).resolve().parents[1] / "conf"
    for group in ("model", "guide"):
        for path in sorted((conf / group).glob("*.yaml")):
            try:
                node = yaml.safe_load(path.read_text()) or {}
                node = node.get(group, node)  # a model's keys sit under `model:` (@package _global_)
                module, _, attr = str(node["_target_"]).rpartition(".")
                names[getattr(importlib.import_module(module), attr)] = str(node["name"])
            except Exception:  # noqa: BLE001  a file that is not a group option: its class keeps its own name
                continue
    return names


# the command line's objective names (conf/objective/*.yaml) of the classes infer.objectives.make_objective builds
OBJECTIVE_NAMES = {"ClosedFormELBO": "closed_form", "Trace_ELBO": "elbo", "TraceMeanField_ELBO": "meanfield_elbo",
                   "IWAE": "iwae", "MarginalLikelihood": "exact"}


@functools.lru_cache(maxsize=None)
def objective_options(name: str) -> dict:
    """The keys conf/objective/<name>.yaml sets besides its name (the command line's defaults under objective=name,
    e.g. K: 16 for iwae), read once; {} where that file cannot be read."""
    import yaml

    try:
        node = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "objective" / f"{name}.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in (node or {}).items() if k != "name"} if isinstance(node, dict) else {}


def cli_training_defaults(model, objective: str) -> dict:
    """{fit's argument: the command line's default for this model and objective}: the model's recipe
    (infer.recipe, which conf/model/*.yaml states), fit's own defaults for the rest (conf/config.yaml's; the tests
    hold both equal) and the objective's options (conf/objective/<objective>.yaml; K is the particle count there)."""
    import inspect

    from infer import fit
    from infer.recipe import recipe

    plan = recipe(model)
    given = {k: p.default for k, p in inspect.signature(fit).parameters.items()
             if k in ("beta", "warmup", "warmup_start", "log_every", "freeze_model")}
    return {"steps": plan.steps, "lr": plan.lr, "lr_final": plan.lr_final, "schedule": plan.schedule,
            "adam_betas": tuple(plan.betas), "average": plan.average, "num_particles": plan.num_particles,
            "noise": plan.noise, "free_bits": 0.0, "objective": "closed_form", **given, **objective_options(objective)}


def fit_keys() -> dict:
    """{fit's argument: its command-line key} for the training settings (train.*, optim.*, objective.*), read off
    infer.validate.CONFIG_KEYS (the one table of config keys and argument names), plus the objective's group."""
    from infer.validate import CONFIG_KEYS

    keys = {arg: key for key, arg in CONFIG_KEYS.items() if key.split(".")[0] in ("train", "optim", "objective")}
    return {**keys, "objective": "objective"}


def training_overrides(model, result) -> dict:
    """{command-line key: value} of the settings fit() trained with (result.recipe) that differ from the command
    line's defaults for this model and objective (cli_training_defaults), keyed as overrides (train.steps, optim.lr,
    objective, objective.K, ...), so that a run written from Python and the command-line run with those overrides
    carry the same keys in a sweep summary. The seed is not a setting here (it is the run's seed); {} where result
    records no recipe. Correct where fit's defaults are the command line's (tests/test_fit.py and
    tests/test_defaults.py hold them equal)."""
    plan = dict(getattr(result, "recipe", None) or {})
    if not plan.get("objective"):
        return {}
    objective = OBJECTIVE_NAMES.get(plan["objective"], plan["objective"])
    plan["objective"] = objective
    defaults = cli_training_defaults(model, objective)
    if "K" in defaults:  # the objective's particle count is objective.K on the command line (iwae)
        plan["K"] = plan.pop("num_particles", None)
    keys = fit_keys()
    out = {}
    for arg, value in plan.items():
        if arg not in keys or value is None or arg not in defaults:
            continue
        value = list(value) if isinstance(value, (list, tuple)) else value  # as JSON holds it
        default = defaults[arg]
        if (list(default) if isinstance(default, (list, tuple)) else default) != value:
            out[keys[arg]] = value
    return out


TRAINED_ON = ("beta", "kl_weight_final", "warmup", "free_bits", "iwae_K")  # the keys trained_on may write


def trained_on(objective: str = None, beta: float = 1.0, warmup: int = 0, warmup_start: float = 0.0,
               steps: int = None, free_bits: float = 0.0, particles: int = None) -> dict:
    """metrics.json's facts on what a run minimised where that was not the -ELBO its loss reports, else {}: beta (a
    KL weight other than 1), kl_weight_final with warmup (a warm-up as long as the run or longer: the KL weight of
    its last step), free_bits (> 0: each site's KL term floored in the objective) and iwae_K (objective iwae: the
    importance-weighted bound with K samples). The same facts from the command line's config and from fit()'s
    recipe (describe), so that runs written either way are labelled alike."""
    from infer.weights import kl_weight

    facts = {}
    if float(beta) != 1.0:
        facts["beta"] = float(beta)
    last = kl_weight(max(int(steps) - 1, 0), float(beta), int(warmup), float(warmup_start)) if steps else beta
    if last != float(beta):  # the weight had not reached beta by the last step: a warm-up as long as the run, or longer
        facts["kl_weight_final"], facts["warmup"] = last, int(warmup)
    if free_bits and float(free_bits) > 0:
        facts["free_bits"] = float(free_bits)
    if objective == "iwae" and particles and int(particles) > 1:
        facts["iwae_K"] = int(particles)
    return facts


def final_kl_weight(facts: dict) -> float:
    """The KL weight of a run's last step from its trained_on facts: kl_weight_final (a warm-up still rising),
    else beta, else 1."""
    return float(facts.get("kl_weight_final", facts.get("beta", 1.0)))


def describe(model, guide, data, result) -> dict:
    """What metrics.json's head says when no config does: model and guide names (the command line's name of a
    class conf/ builds, e.g. vae and gaussian, so that runs written from Python and by run.py share their labels in
    a sweep summary; else their class or function names), the settings such a class was built with that its
    command-line option does not set and the settings fit() trained with that the command line's defaults for the
    model do not set ('arguments', keyed as overrides: {"model.hidden": 16, "train.steps": 300}; training_overrides;
    a sweep summary reads them as a Python run's overrides), n, and fit()'s steps, wall_seconds and engine (and its
    seed where the result records one); from fit()'s recipe, the objective (its command-line name) and what the run
    minimised where that was not the -ELBO (trained_on); and the machine it ran on (infer.runtime.machine: the CPU,
    whose kernels decide the last bits, and the versions)."""
    from infer.runtime import machine
    from models.arguments import changed_arguments

    known = config_names()

    def name(obj):
        return known.get(type(obj)) or getattr(obj, "__name__", None) or type(obj).__name__

    head = {"model": name(model), "guide": name(guide), "n": data.n}
    arguments = {f"{group}.{k}": v for group, obj in (("model", model), ("guide", guide)) if type(obj) in known
                 for k, v in changed_arguments(obj).items()}
    arguments.update(training_overrides(model, result))  # and those fit trained with that its defaults do not
    if arguments:  # the settings of networks and training that the command line's defaults do not set
        head["arguments"] = arguments
    seed = getattr(result, "seed", None)
    if seed is None:  # fit()'s FitResult records its seed in its recipe
        seed = (getattr(result, "recipe", None) or {}).get("seed")
    if seed is not None:
        head["seed"] = seed
    for key in ("steps", "wall_seconds", "engine"):
        if getattr(result, key, None) is not None:
            head[key] = getattr(result, key)
    plan = getattr(result, "recipe", None) or {}
    if plan.get("objective"):  # what fit() trained on, named as the command line names it
        head["objective"] = OBJECTIVE_NAMES.get(plan["objective"], plan["objective"])
        head.update(trained_on(head["objective"], plan.get("beta", 1.0), plan.get("warmup") or 0,
                               plan.get("warmup_start") or 0.0, plan.get("steps"), plan.get("free_bits") or 0.0,
                               plan.get("num_particles")))
    head["machine"] = machine()
    return head


def write_run(out: Path, model, guide, data, result, metrics: dict, grids=None, figures: bool = True,
              title: str = None, checkpoint: bool = True, overwrite: bool = False) -> None:
    """Write a run into the directory out (made if missing): status.json, metrics.json, history.csv, checkpoint.pt
    (unless checkpoint=False), encodings.nc and (figures=True) encodings.png and training.png. result is fit()'s
    return value; grids come from evaluate(). metrics.json gets the model and guide names, n, seed, steps,
    wall_seconds and engine from `describe` where metrics lacks them.

    The directory is claimed as the command line claims a run's (analysis.claim.Claim): a directory that already
    holds a run (its status.json, metrics.json, checkpoint.pt, ...: analysis.rundir.occupant), one whose run is still
    running (live_owner), one inside another run's directory, one that holds runs below it, or the current
    directory while it holds other files, is refused in one line (ValueError) before anything is written.
    overwrite=True replaces the run there whole: its files (analysis.rundir.RUN_FILES: a command-line run's .hydra/
    and figures too) are moved aside first and deleted once the new run is written, or put back if writing fails;
    files that are not a run's are never touched. figures, checkpoint and overwrite must be True or False (a
    ValueError in one line names the one that is not)."""
    from infer.validate import shown

    from .claim import Claim
    from .rundir import live_owner, occupant, run_path

    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise ValueError(f"out={shown(out)} is not allowed: out must be a directory's path (str or pathlib.Path)")
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics={shown(metrics)} is not allowed: metrics must be the dict evaluate() returns first")
    if not hasattr(result, "history") or not hasattr(result, "steps"):
        raise ValueError(f"result={shown(result)} is not allowed: result must be what fit() returned")
    if grids is not None and not isinstance(grids, dict):
        raise ValueError(f"grids={shown(grids)} is not allowed: grids must be None or the dict evaluate() returns "
                         "second")
    for label, value in (("figures", figures), ("overwrite", overwrite), ("checkpoint", checkpoint)):
        if not isinstance(value, bool):
            raise ValueError(f"{label}={shown(value)} is not allowed: {label} must be True or False")
    out = run_path(out)  # /a/new/../b is /a/b, where no folder 'new' is made
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is not allowed: it is a file; out must be a directory (made if missing)")
    held = occupant(out)
    pid = live_owner(out) if held else None
    if pid is not None:  # replacing it would pull its files from under a run that is still writing them
        raise ValueError(f"out={out} is not allowed: the run there is still running (pid {pid}); wait for it to end, "
                         "or choose another directory")
    if held and not overwrite:
        raise ValueError(f"out={out} is not allowed: it already holds {held}; choose another directory, or pass "
                         "overwrite=True to replace it")
    metrics = judged(result, data, metrics)
    claim = Claim(out, allow_existing=bool(held), replace=bool(held), key="out")
    try:
        write_outputs(out, model, guide, data, result, metrics, grids, figures=figures, title=title,
                      checkpoint=checkpoint)
    except BaseException:
        claim.release()
        raise
    status = metrics.get("status") if metrics.get("status") in ("diverged", "failed") else "ok"
    claim.status(status, metrics.get("reason", "") if status != "ok" else "written by analysis.write_run")


def judged(result, data, metrics: dict) -> dict:
    """metrics as the command line would write them for this run: where they carry no status and the run counts as
    diverged (infer.result.worse_than_no_latent: the headline, with the run's beta, above the no-latent loss and its
    start, or not finite), status 'diverged' with the reason, and the headline loss moved to loss_judged_diverged
    (a RuntimeWarning says so)."""
    import warnings

    from infer.result import worse_than_no_latent

    if metrics.get("status") is not None:
        return metrics
    plan = getattr(result, "recipe", None) or {}
    objective = plan.get("objective")
    reason = worse_than_no_latent(result, data, plan.get("beta", 1.0), final=metrics,
                                  objective=OBJECTIVE_NAMES.get(objective, objective))
    if not reason:
        return metrics
    reason += "; lower lr"
    warnings.warn(f"the run is written as diverged: {reason}", RuntimeWarning, stacklevel=3)
    return {**metrics, "status": "diverged", "reason": reason, "loss": None,
            "loss_judged_diverged": metrics.get("loss")}


def write_outputs(out: Path, model, guide, data, result, metrics: dict, grids=None, figures: bool = True,
                  title: str = None, checkpoint: bool = True) -> dict:
    """Write a run's outputs (write_run's files but status.json) into out, a directory its caller has claimed (the
    command line's job, or write_run): nothing here checks what the directory holds. Each file is written whole or
    not at all (through a temporary file: a full disk is one OSError naming it). Returns the metrics as written to
    metrics.json (metrics, and what describe() adds)."""
    from . import encodings as enc
    from .figures import encoding_figure
    from .training_figure import training_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {**{k: v for k, v in describe(model, guide, data, result).items() if k not in metrics}, **metrics}
    write_atomic(out / "history.csv", pd.DataFrame(result.history).to_csv(index=False))
    if checkpoint:
        save_checkpoint(out / "checkpoint.pt", result,
                        extra={k: metrics[k] for k in ("model", "guide") if k in metrics})
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    idata = enc.encodings(model, guide, data, grids=grids, khat=metrics.get("psis"))
    enc.save(idata, out / "encodings.nc")
    log.debug("ArviZ summary of the encodings (guide samples per data point):\n%s", enc.summary_text(idata))
    if figures:
        encoding_figure(idata, out / "encodings.png", title=title)
        minimised = any(k in metrics for k in TRAINED_ON)  # the run minimised something other than the -ELBO
        training_figure(result.history, out / "training.png", floor=data.entropy,
                        optimum=metrics.get("gaussian_optimum"), title=title, objective=minimised)
    return metrics
