"""A run written from Python in the command line's terms: its model and guide names, the settings of its networks and
of its training that differ from the command line's defaults for that model and objective (keyed as overrides, so
that a sweep summary groups it with the run.py run of the same settings), what it minimised where that was not the
-ELBO, and the machine. run_outputs.write_run heads metrics.json with `describe` where no config heads it."""
import functools
from pathlib import Path


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


def conf_file(*parts: str) -> dict:
    """The mapping conf/<parts...>.yaml holds; {} where that file cannot be read or holds no mapping."""
    import yaml

    try:
        node = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("conf", *parts).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return node if isinstance(node, dict) else {}


def autoguide_settings(guide) -> dict:
    """The settings a Pyro autoguide was built with, under the keys of its conf/guide/ option (AutoNormal:
    init_scale; AutoIAFNormal: hidden_dim, num_transforms, and any further keyword its transforms were given),
    read off the guide; {} for any other guide (the suite's own classes record theirs: models.arguments)."""
    from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

    if isinstance(guide, AutoIAFNormal):
        built = getattr(guide, "_init_transform_fn", None)  # partial(iterated, num_transforms, ..., hidden_dims=...)
        if isinstance(built, functools.partial) and built.args:
            more = {k: v if isinstance(v, (int, float, str, bool, type(None))) else getattr(v, "__name__", repr(v))
                    for k, v in built.keywords.items() if k != "hidden_dims"}
            hidden = built.keywords.get("hidden_dims")
            return {"hidden_dim": None if hidden is None else [int(h) for h in hidden],
                    "num_transforms": int(built.args[0]), **more}
    elif isinstance(guide, AutoNormal):
        return {"init_scale": float(guide._init_scale)}
    return {}


def autoguide_overrides(guide, name: str) -> dict:
    """{guide.<key>: value} of a Pyro autoguide's settings (autoguide_settings) that differ from the values its
    command-line option conf/guide/<name>.yaml gives it (which are not Pyro's defaults: autoiaf's num_transforms is
    2, Pyro's 1), so that it is not counted as a seed of `python run.py guide=<name>`."""
    option = conf_file("guide", f"{name}.yaml")
    return {f"guide.{k}": v for k, v in autoguide_settings(guide).items() if option.get(k, _UNKNOWN) != v}


def settings(model, guide, data, result, model_phase=None) -> dict:
    """{command-line key: value} of every setting a Python run's overrides could name, at the value it ran with (not
    only those away from the command line's defaults, as `arguments`): the data's weights, the networks' recorded
    arguments (a Pyro autoguide's settings), and fit()'s training settings under their keys (objective, optim.lr,
    train.steps, ...). A sweep summary fills a run's value of a key that another run overrides from it (a command-line
    run's from its .hydra/config.yaml), so that `optim.lr=3e-3` given where 0.003 is the default is not another
    configuration. metrics.json's `settings` (write_run adds the evaluation's, as eval.*)."""
    known = config_names()
    base = {k: v for k, v in conf_file("config.yaml").items() if k not in ("defaults", "hydra", "seed", "eval")}
    out = {k: v for k, v in dotted(base).items()  # conf/config.yaml's, but those that change no number and those
           if v is not None and k not in ("overwrite", "train.progress", "eval.figures", "threads", "device",
                                          "memory_gb", "train.checkpoint_every")}  # fit's result does not record
    out["data.weights"] = [float(w) for w in getattr(data, "weights", ())]
    replicas = (getattr(result, "recipe", None) or {}).get("replicas")
    out["replicas"] = replicas if isinstance(replicas, int) and replicas > 1 else 1
    for group, obj in (("model", model), ("guide", guide)):
        if type(obj) in known:
            recorded = getattr(obj, "arguments", None)
            values = recorded if isinstance(recorded, dict) else autoguide_settings(obj)
            out.update({f"{group}.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in values.items()
                        if not (group == "model" and k == "n")})
    plan = dict(getattr(result, "recipe", None) or {})
    if plan.get("objective"):
        objective = "exact" if model_phase is not None else OBJECTIVE_NAMES.get(plan["objective"], plan["objective"])
        out["objective"] = objective
        if objective == "iwae":  # the objective's particle count is objective.K on the command line, and its
            plan["K"] = plan.pop("num_particles", None)  # train.num_particles the model option's, unused: unsaid
            out.pop("train.num_particles", None)
        if model_phase is not None:
            plan.pop("freeze_model", None)
        keys = fit_keys()
        out.update({keys[arg]: (list(v) if isinstance(v, tuple) else v) for arg, v in plan.items()
                    if arg in keys and arg != "objective" and v is not None})
    if model_phase is not None:  # objective=exact's model phase: its lattice and step budget
        first = getattr(model_phase, "recipe", None) or {}
        out.update({f"objective.{k}": first[k] for k in ("nodes", "inner_nodes") if first.get(k) is not None})
        if type(model) in known and first.get("steps") is not None:
            out[f"objective.steps.{known[type(model)]}"] = first["steps"]
    return out


def data_overrides(data) -> dict:
    """{"data.weights": [w0, w1]} where the data's weights are not the command line's default (conf/data/onebit.yaml),
    else {}: a run on other weights is another configuration, as `python run.py data.weights=[...]` is."""
    weights = [float(w) for w in getattr(data, "weights", ())]
    default = conf_file("data", "onebit.yaml").get("weights")
    if not weights or not isinstance(default, list) or weights == [float(w) for w in default]:
        return {}
    return {"data.weights": weights}


@functools.lru_cache(maxsize=None)
def objective_options(name: str) -> dict:
    """The keys conf/objective/<name>.yaml sets besides its name (the command line's defaults under objective=name,
    e.g. K: 16 for iwae), read once; {} where that file cannot be read."""
    return {k: v for k, v in conf_file("objective", f"{name}.yaml").items() if k != "name"}


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
            "noise": plan.noise, "free_bits": 0.0, "objective": "closed_form", **given,
            **{k: v for k, v in objective_options(objective).items() if k != "steps"}}  # exact's steps: per model


def fit_keys() -> dict:
    """{fit's argument: its command-line key} for the training settings (train.*, optim.*, objective.*), read off
    infer.validate.CONFIG_KEYS (the one table of config keys and argument names), plus the objective's group."""
    from infer.validate import CONFIG_KEYS

    keys = {arg: key for key, arg in CONFIG_KEYS.items() if key.split(".")[0] in ("train", "optim", "objective")}
    return {**keys, "objective": "objective"}


def training_overrides(model, result, model_phase=None) -> dict:
    """{command-line key: value} of the settings fit() trained with (result.recipe) that differ from the command
    line's defaults for this model and objective (cli_training_defaults), keyed as overrides (train.steps, optim.lr,
    objective, objective.K, ...), so that a run written from Python and the command-line run with those overrides
    carry the same keys in a sweep summary. The seed is not a setting here (it is the run's seed); {} where result
    records no recipe. Correct where fit's defaults are the command line's (tests/test_fit.py and
    tests/test_defaults.py hold them equal). With model_phase (the fit that trained the model by its exact
    likelihood before `result` fitted the guide to it, frozen) the run is objective=exact's: its guide phase is
    compared with that objective's defaults, and the model phase's lattice and step budget are keyed as
    objective.nodes, objective.inner_nodes and objective.steps.<model>."""
    plan = dict(getattr(result, "recipe", None) or {})
    if not plan.get("objective"):
        return {}
    objective = OBJECTIVE_NAMES.get(plan["objective"], plan["objective"])
    if model_phase is not None:  # objective=exact's guide phase: the closed-form ELBO, the model frozen
        objective = "exact"
        plan.pop("freeze_model", None)
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
    if plan.get("vectorize_particles") is False:  # e.g. Pyro's Trace_ELBO(num_particles=32): particles one by one,
        out["objective.vectorize_particles"] = False  # other draws than the command line's (make_objective vectorises)
    if out.get("train.freeze_model") and built_from_seed(model, plan.get("seed")) is False:
        out["model.init"] = "given"  # a frozen model that is not the one the command line freezes (see there)
    if plan.get("init") == "keep":  # warm-started (fit(..., init="keep")): no command-line run starts so, every
        out["train.init"] = "keep"  # one draws its parameters from its seed; no command-line key (as eval.seed)
    if model_phase is not None:
        out.update(_model_phase_overrides(model, model_phase))
    return out


def built_from_seed(model, seed):
    """Whether model's parameters and buffers are those its class builds right after pyro.set_rng_seed(seed): the
    model the command line's train.freeze_model=true freezes (cli.job seeds, then cli.build builds it, and fit never
    redraws a frozen model). None where that cannot be told (no seed, not an nn.Module recording the arguments it
    was built with: models.arguments). The global RNGs are left as they were."""
    import random

    import numpy as np
    import pyro
    import torch

    recorded = getattr(model, "arguments", None)
    if seed is None or not isinstance(model, torch.nn.Module) or not isinstance(recorded, dict):
        return None
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            pyro.set_rng_seed(int(seed))
            fresh = type(model)(**recorded).state_dict()
    except Exception:  # noqa: BLE001  a class that cannot be built again from what it recorded: not told
        return None
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    mine = model.state_dict()
    return mine.keys() == fresh.keys() and all(
        mine[k].shape == fresh[k].shape and torch.equal(mine[k].detach().cpu().to(fresh[k].dtype), fresh[k])
        for k in mine)


def _model_phase_overrides(model, first) -> dict:
    """The model phase's settings that objective=exact's defaults do not set, as overrides: its lattice
    (objective.nodes, objective.inner_nodes) and its step budget (objective.steps.<model>)."""
    plan, options, keys = dict(getattr(first, "recipe", None) or {}), objective_options("exact"), fit_keys()
    out = {keys[arg]: plan[arg] for arg in ("nodes", "inner_nodes") if arg in plan and plan[arg] != options.get(arg)}
    name = config_names().get(type(model))
    if name and plan.get("steps") != (options.get("steps") or {}).get(name):
        out[f"objective.steps.{name}"] = plan.get("steps")
    return out


def dotted(node: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted key: value}: {"model": {"hidden": 64}} -> {"model.hidden": 64} (lists kept)."""
    out = {}
    for k, v in node.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@functools.lru_cache(maxsize=None)
def recipe_settings(objective: str, model: str) -> dict:
    """{config key: value} that conf/recipe/<objective>_<model>.yaml sets (the command line composes it after the
    model's own option: conf/config.yaml's `recipe: ${objective}_${model}`), read once; {} where there is none."""
    return dotted(conf_file("recipe", f"{objective}_{model}.yaml"))


_UNKNOWN = object()


def with_recipe(arguments: dict, recipe: dict, model, guide, result) -> dict:
    """arguments (a Python run's overrides against the command line's defaults) against a recipe's settings
    instead, where the command line composes one for this objective and model: a setting equal to the recipe's is
    no override, and one the run left at the default where the recipe sets another is one."""
    out, args = dict(arguments), {key: arg for arg, key in fit_keys().items()}
    plan = getattr(result, "recipe", None) or {}
    for key, wanted in recipe.items():
        group, _, name = key.partition(".")
        if group in ("model", "guide"):
            have = (getattr(model if group == "model" else guide, "arguments", None) or {}).get(name, _UNKNOWN)
        else:
            have = plan.get(args.get(key), _UNKNOWN)
        if have is _UNKNOWN:
            continue
        have = list(have) if isinstance(have, tuple) else have
        if have == wanted:
            out.pop(key, None)
        else:
            out[key] = have
    return out


@functools.lru_cache(maxsize=None)
def cli_eval_defaults() -> dict:
    """The command line's evaluation defaults (conf/config.yaml's eval.*, but figures, which changes no number),
    read once; {} where that file cannot be read."""
    return {k: v for k, v in (conf_file("config.yaml").get("eval") or {}).items() if k != "figures"}


# evaluate()'s settings that no eval.* key sets, at the values the command line evaluates with: a Python run evaluated
# otherwise (no quadrature, another number of k-hat draws) records them as eval.exact and eval.khat_samples
PYTHON_EVAL_DEFAULTS = {"exact": True, "khat_samples": None}


def evaluation_overrides(settings, seed=None) -> dict:
    """{eval.<key>: value} of an evaluation's settings (metrics['evaluation'], as evaluate records them) that differ
    from the command line's defaults: a Python run evaluated otherwise is another configuration, as a command-line
    run with those overrides is. The command line evaluates with the run's seed; an evaluation seed other than the
    run's `seed` is eval.seed (no command-line key: such a run is no command-line run's seed)."""
    defaults = cli_eval_defaults()
    if not isinstance(settings, dict):
        return {}
    out = {f"eval.{k}": v for k, v in settings.items() if k in defaults and defaults[k] != v}
    out.update({f"eval.{k}": settings[k] for k, v in PYTHON_EVAL_DEFAULTS.items() if settings.get(k, v) != v})
    if seed is not None and settings.get("seed") is not None and settings["seed"] != seed:
        out["eval.seed"] = settings["seed"]
    return out


GUIDE_PHASE = "the guide fitted to the frozen model by the closed-form ELBO: its gap is the family's price"


def model_phase_record(first) -> dict:
    """What an objective=exact run's checkpoints keep of its model phase (the fit that trained the model by its
    exact likelihood): steps, seconds, engine and history, from which a resume reports it (model_phase_facts)."""
    return {"steps": first.steps, "wall_seconds": first.wall_seconds, "engine": first.engine,
            "history": list(first.history)}


def model_phase_facts(first) -> dict:
    """metrics.json's `model_phase` of an objective=exact run: the fit that trained the model by its exact
    likelihood (its steps, seconds, engine and last logged window's NLL); first: that fit's result, or a
    model_phase_record as an attribute namespace."""
    return {"objective": "exact likelihood (infer.marginal.MarginalLikelihood)", "steps": first.steps,
            "wall_seconds": first.wall_seconds, "engine": first.engine,
            "last_window_nll": first.history[-1]["nll"] if first.history else None}


# what the command line's objective=exact trains both phases with (one config)
SHARED_BY_PHASES = ("seed", "lr", "lr_final", "schedule", "adam_betas", "log_every")


def check_two_phases(model, first, result) -> None:
    """A ValueError in one line unless `first` trained the model by its exact likelihood and `result` then fitted
    the guide to it frozen, with the settings the command line's objective=exact gives both phases
    (SHARED_BY_PHASES equal; the model phase averaged as fit's default for the model, infer.recipe, since the command
    line passes it none): a run written as that command line's must be one."""
    from infer.recipe import recipe
    from infer.validate import shown

    plan = getattr(first, "recipe", None) or {}
    if not hasattr(first, "history") or OBJECTIVE_NAMES.get(plan.get("objective")) != "exact":
        raise ValueError(f"model_phase={shown(first)} is not allowed: model_phase must be what fit(model, None, data, "
                         "elbo=MarginalLikelihood(...)) returned (the model trained by its exact likelihood)")
    if result is None or not (getattr(result, "recipe", None) or {}).get("freeze_model"):
        raise ValueError(f"result={shown(result)} is not allowed with model_phase: result must be the fit of the guide "
                         "to the frozen model (fit(..., freeze_model=True)) after the model phase")
    guide_plan = result.recipe
    differ = [f"{k}={plan.get(k)!r} (the guide phase: {guide_plan.get(k)!r})" for k in SHARED_BY_PHASES
              if _plain(plan.get(k)) != _plain(guide_plan.get(k))]
    if plan.get("average") != recipe(model).average:
        differ.append(f"average={plan.get('average')!r} (the command line's: {recipe(model).average!r}, fit's default "
                      "for the model)")
    if differ:
        raise ValueError("model_phase is not allowed with these settings: the command line's objective=exact trains "
                         f"both phases with one config, and its model phase had {', '.join(differ)}")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def two_phase_history(first, result) -> list:
    """history.csv's rows of an objective=exact run: the model phase's, then the guide phase's, its steps counted
    on from the model phase's, each row named by its phase."""
    return [{"phase": "model", **row} for row in first.history] + [
        {"phase": "guide", **row, "step": first.steps + row["step"]} for row in result.history]


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


def result_seed(result):
    """The seed a fit's result was trained with (a replica's own; fit()'s FitResult records it in its recipe), or
    None."""
    seed = getattr(result, "seed", None)
    return (getattr(result, "recipe", None) or {}).get("seed") if seed is None else seed


def describe(model, guide, data, result, model_phase=None) -> dict:
    """What metrics.json's head says when no config does: model and guide names (the command line's name of a
    class conf/ builds, e.g. vae and gaussian, so that runs written from Python and by run.py share their labels in
    a sweep summary; else their class or function names), the settings such a class was built with that its
    command-line option does not set and the settings fit() trained with that the command line's defaults for the
    model do not set, and the data's weights where they are not the command line's (data_overrides) ('arguments', keyed
    as overrides: {"model.hidden": 16, "train.steps": 300}; training_overrides;
    a sweep summary reads them as a Python run's overrides; a replica of fit_replicas' R > 1 adds replicas=R, as the
    command line's replicas=R group does, and `replicas` in the head), n, and fit()'s steps, wall_seconds and engine
    (and its seed where the result records one); from fit()'s recipe, the objective (its command-line name) and what
    the run minimised where that was not the -ELBO (trained_on); and the machine it ran on (infer.runtime.machine:
    the CPU, whose kernels decide the last bits, and the versions). With model_phase (the fit that trained the model
    by its exact likelihood before `result` fitted the guide to it, frozen), the run is objective=exact's, recorded
    as the command line records one: objective 'exact', `model_phase` (model_phase_facts) and `guide_phase`. Where the
    command line composes a recipe for the objective and model (conf/recipe/), the settings are overrides against
    it (with_recipe), and `recipe` names its file."""
    from infer.runtime import machine
    from models.arguments import changed_arguments

    known = config_names()

    def name(obj):
        return known.get(type(obj)) or getattr(obj, "__name__", None) or type(obj).__name__

    head = {"model": name(model), "guide": name(guide), "n": data.n}
    arguments = {f"{group}.{k}": v for group, obj in (("model", model), ("guide", guide)) if type(obj) in known
                 for k, v in changed_arguments(obj).items()}
    if type(guide) in known:  # a Pyro autoguide records no arguments: its settings against its option's
        arguments.update(autoguide_overrides(guide, known[type(guide)]))
    arguments.update(data_overrides(data))  # the data's weights, where they are not the command line's
    arguments.update(training_overrides(model, result, model_phase))  # and those fit trained with, likewise
    plan = getattr(result, "recipe", None) or {}
    objective = "exact" if model_phase is not None else OBJECTIVE_NAMES.get(plan.get("objective"))
    if objective and type(model) in known:
        recipe = recipe_settings(objective, known[type(model)])
        arguments = with_recipe(arguments, recipe, model, guide, result)
        if recipe:  # named as the command line's run names the recipe it composed (cli.job.recipe_fact)
            head["recipe"] = f"conf/recipe/{objective}_{known[type(model)]}.yaml"
    replicas = plan.get("replicas")
    if isinstance(replicas, int) and replicas > 1:  # one of fit_replicas' R (R=1 is a single run): the command
        arguments["replicas"] = head["replicas"] = replicas  # line's replicas=R override, and its replicas' head
    if arguments:  # the settings of networks and training that the command line's defaults do not set
        head["arguments"] = arguments
    seed = result_seed(result)
    if seed is not None:
        head["seed"] = seed
    for key in ("steps", "wall_seconds", "engine"):
        if getattr(result, key, None) is not None:
            head[key] = getattr(result, key)
    if plan.get("objective"):  # what fit() trained on, named as the command line names it
        head["objective"] = objective or plan["objective"]
        head.update(trained_on(head["objective"], plan.get("beta", 1.0), plan.get("warmup") or 0,
                               plan.get("warmup_start") or 0.0, plan.get("steps"), plan.get("free_bits") or 0.0,
                               plan.get("num_particles")))
    if model_phase is not None:
        head["model_phase"], head["guide_phase"] = model_phase_facts(model_phase), GUIDE_PHASE
    head["settings"] = settings(model, guide, data, result, model_phase)
    head["machine"] = machine()
    return head
