"""Python and the command line build the same networks: every key a conf/model or conf/guide option sets for one of
the suite's own classes equals that class's constructor default, so VAE(n), DLGM(n) and their guides built in Python
are the networks `python run.py` trains."""
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
OWN = ("models.", "guides.")  # Pyro's autoguides (conf/guide/auto*.yaml) keep Pyro's defaults: the conf chooses its own


def _options():
    for group in ("model", "guide"):
        for path in sorted((CONF / group).glob("*.yaml")):
            node = yaml.safe_load(path.read_text())
            node = node.get(group, node)  # a model option is packaged _global_ with its keys under model:
            if node.get("_target_", "").startswith(OWN):
                yield pytest.param(node, id=f"{group}={path.stem}")


def _constructor(target: str):
    module, name = target.rsplit(".", 1)
    return inspect.signature(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize("node", list(_options()))
def test_a_conf_option_sets_the_constructors_defaults(node):
    params = _constructor(node["_target_"]).parameters
    settings = {k: v for k, v in node.items() if not k.startswith("_") and k != "name"}
    assert set(settings) <= set(params), f"conf keys that are not constructor arguments: {set(settings) - set(params)}"
    differ = {k: (params[k].default, v) for k, v in settings.items() if params[k].default != v}
    assert not differ, f"constructor default != conf value: {differ}"


def test_the_defaults_check_sees_every_own_option():
    names = {p.id for p in _options()}
    assert {"model=vae", "model=dlgm", "guide=gaussian", "guide=structured", "guide=meanfield", "guide=flow",
            "guide=mixture"} <= names


@pytest.mark.parametrize("name", ["vae", "dlgm"])
def test_python_with_the_default_networks_gives_the_command_lines_numbers_bit_for_bit(tmp_path, name):
    import json

    from conftest import run_cli

    from analysis.report import evaluate
    from guides import GaussianGuide, StructuredGuide
    from infer import fit
    from models import DLGM, VAE, OneBit

    steps, seed, samples, replicates = 300, 2, 10000, 4 # 300 steps: the traced plan trains, as in a default run
    proc = run_cli(f"model={name}", "data.n=5", f"train.steps={steps}", f"seed={seed}", f"eval.samples={samples}",
                   f"eval.replicates={replicates}", "eval.figures=false", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cli = json.loads((tmp_path / "run" / "metrics.json").read_text())

    data = OneBit(5)
    model = VAE(data.n) if name == "vae" else DLGM(data.n)
    guide = GaussianGuide(model) if name == "vae" else StructuredGuide(model)
    fit(model, guide, data, steps=steps, seed=seed)
    python, _ = evaluate(model, guide, data, samples=samples, replicates=replicates, seed=seed)
    assert (python["loss"], python["exact"]["nll"], python["montecarlo"]["loss"]) == (
        cli["loss"], cli["exact"]["nll"], cli["montecarlo"]["loss"])


def test_the_readmes_python_recipe_for_objective_exact_gives_the_command_lines_numbers_bit_for_bit(tmp_path):
    import json

    from conftest import run_cli

    from analysis.report import evaluate
    from guides import GaussianGuide
    from infer import fit
    from infer.marginal import MarginalLikelihood
    from models import VAE, OneBit

    model_steps, steps, seed, samples, replicates = 200, 200, 1, 10000, 4
    proc = run_cli("objective=exact", "data.n=5", f"objective.steps.vae={model_steps}", f"train.steps={steps}",
                   f"seed={seed}", f"eval.samples={samples}", f"eval.replicates={replicates}", "eval.figures=false",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cli = json.loads((tmp_path / "run" / "metrics.json").read_text())

    data = OneBit(5)  # the README's recipe ("Training by the exact likelihood"), with these budgets
    model = VAE(data.n)
    guide = GaussianGuide(model)
    fit(model, None, data, elbo=MarginalLikelihood(nodes=64, inner_nodes=4), steps=model_steps, seed=seed)
    result = fit(model, guide, data, steps=steps, seed=seed, freeze_model=True)
    python, _ = evaluate(model, guide, data, samples=samples, replicates=replicates, seed=seed, result=result)
    assert (python["loss"], python["exact"]["nll"], python["montecarlo"]["loss"]) == (
        cli["loss"], cli["exact"]["nll"], cli["montecarlo"]["loss"])


def test_a_sweeps_job_dir_names_leave_out_exactly_the_keys_that_change_no_number():
    from analysis.aggregate import NO_RESULT_KEYS

    conf = yaml.safe_load((CONF / "config.yaml").read_text())
    excluded = conf["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    assert sorted(excluded) == sorted(NO_RESULT_KEYS)


def _recipes():
    for path in sorted((CONF / "recipe").glob("*.yaml")):
        objective, model = path.stem.split("_", 1)
        yield pytest.param(objective, model, yaml.safe_load(path.read_text()), id=path.stem)


def _flat(node, prefix=""):
    for k, v in node.items():
        yield from _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]


@pytest.mark.parametrize("objective, model, recipe", list(_recipes()))
def test_an_objective_and_model_with_a_recipe_compose_its_settings(objective, model, recipe):
    from omegaconf import OmegaConf

    from cli.keys import compose_config

    composed = compose_config([f"objective={objective}", f"model={model}"])
    plain = compose_config([f"model={model}"])
    settings = dict(_flat(recipe))
    assert settings and {k: OmegaConf.select(composed, k) for k in settings} == settings
    assert any(OmegaConf.select(plain, k) != v for k, v in settings.items()), "the recipe changes nothing"


@pytest.mark.parametrize("objective, model, recipe", list(_recipes()))
def test_the_command_line_wins_over_a_recipe(objective, model, recipe):
    from omegaconf import OmegaConf

    from cli.keys import compose_config

    key, value = next((k, v) for k, v in _flat(recipe) if isinstance(v, (int, float)) and not isinstance(v, bool))
    composed = compose_config([f"objective={objective}", f"model={model}", f"{key}={value * 2}"])
    assert OmegaConf.select(composed, key) == value * 2


def test_a_recipe_is_not_chosen_by_hand(tmp_path):
    from conftest import run_cli

    proc = run_cli("recipe=exact_dlgm", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: recipe=exact_dlgm is not allowed: recipe follows from objective and model "
        "(conf/recipe/<objective>_<model>.yaml, where one exists); override the keys it sets instead "
        "(e.g. model.prior_layers=3)"]
    assert not (tmp_path / "run").exists()


def test_python_with_the_dlgms_exact_recipe_gives_the_command_lines_numbers_bit_for_bit(tmp_path):
    import json

    from conftest import run_cli

    from analysis.report import evaluate
    from guides import StructuredGuide
    from infer import fit
    from infer.marginal import MarginalLikelihood
    from models import DLGM, OneBit

    recipe = yaml.safe_load((CONF / "recipe" / "exact_dlgm.yaml").read_text())
    model_steps, steps, seed, samples, replicates = 100, 100, 1, 10000, 4
    proc = run_cli("objective=exact", "model=dlgm", "data.n=5", f"objective.steps.dlgm={model_steps}",
                   f"train.steps={steps}", f"seed={seed}", f"eval.samples={samples}", f"eval.replicates={replicates}",
                   "eval.figures=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cli = json.loads((tmp_path / "run" / "metrics.json").read_text())

    data = OneBit(5)  # conf/recipe/exact_dlgm.yaml's networks and optimiser, in both phases
    model = DLGM(data.n, **recipe["model"])
    guide = StructuredGuide(model)
    optim = {"adam_betas": tuple(recipe["optim"]["betas"]), "lr_final": recipe["optim"]["lr_final"]}
    fit(model, None, data, elbo=MarginalLikelihood(nodes=64, inner_nodes=4), steps=model_steps, seed=seed, **optim)
    result = fit(model, guide, data, steps=steps, seed=seed, freeze_model=True, **optim)
    python, _ = evaluate(model, guide, data, samples=samples, replicates=replicates, seed=seed, result=result)
    assert (python["loss"], python["exact"]["nll"], python["montecarlo"]["loss"]) == (
        cli["loss"], cli["exact"]["nll"], cli["montecarlo"]["loss"])
