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
    from analysis.describe import recipe_settings

    for path in sorted((CONF / "recipe").glob("*.yaml")):
        objective, model = path.stem.rsplit("_", 1)  # objective names hold "_" (closed_form)
        yield pytest.param(objective, model, recipe_settings(objective, model), id=path.stem)


@pytest.mark.parametrize("objective, model, recipe", list(_recipes()))
def test_an_objective_and_model_with_a_recipe_compose_its_settings(objective, model, recipe):
    from omegaconf import OmegaConf

    from cli.keys import compose_config

    composed = compose_config([f"objective={objective}", f"model={model}"])
    plain = compose_config([f"model={model}"])
    settings = recipe
    assert settings and {k: OmegaConf.select(composed, k) for k in settings} == settings
    assert any(OmegaConf.select(plain, k) != v for k, v in settings.items()), "the recipe changes nothing"


@pytest.mark.parametrize("objective, model, recipe", list(_recipes()))
def test_the_command_line_wins_over_a_recipe(objective, model, recipe):
    from omegaconf import OmegaConf

    from cli.keys import compose_config

    key, value = next((k, v) for k, v in recipe.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
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


@pytest.mark.parametrize("name", ["vae", "dlgm"])
def test_a_python_run_of_both_exact_phases_is_the_command_lines_objective_exact_run(tmp_path, name):
    import json

    from conftest import run_cli

    from analysis.report import evaluate, write_run
    from analysis.sweep import summarize
    from guides import GaussianGuide, StructuredGuide
    from infer import fit
    from infer.marginal import MarginalLikelihood
    from models import DLGM, VAE, OneBit

    model_steps, steps = 60, 60  # the command line's evaluation settings on both sides: they are part of a config
    proc = run_cli("objective=exact", f"model={name}", "data.n=3", f"objective.steps.{name}={model_steps}",
                   f"train.steps={steps}", "seed=0", "eval.figures=false", f"hydra.run.dir={tmp_path / 'cli'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    data = OneBit(3)  # the command line's recipe for objective=exact and this model, seed 1
    recipe = yaml.safe_load((CONF / "recipe" / f"exact_{name}.yaml").read_text()) if name == "dlgm" else {}
    model = DLGM(data.n, **recipe["model"]) if name == "dlgm" else VAE(data.n)
    guide = StructuredGuide(model) if name == "dlgm" else GaussianGuide(model)
    optim = {"adam_betas": tuple(recipe["optim"]["betas"]), "lr_final": recipe["optim"]["lr_final"]} if recipe else {}
    first = fit(model, None, data, elbo=MarginalLikelihood(nodes=64, inner_nodes=4), steps=model_steps, seed=1,
                **optim)
    result = fit(model, guide, data, steps=steps, seed=1, freeze_model=True, **optim)
    metrics, grids = evaluate(model, guide, data, seed=1, result=result, model_phase=first)
    write_run(tmp_path / "python", model, guide, data, result, metrics, grids, figures=False, model_phase=first)

    cli, python = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("cli", "python"))
    assert python["objective"] == cli["objective"] == "exact"
    assert python["model_phase"]["steps"] == cli["model_phase"]["steps"] == model_steps
    assert python["guide_phase"] == cli["guide_phase"]
    history = (tmp_path / "python" / "history.csv").read_text().splitlines()
    assert history[0].startswith("phase,") and history[-1].startswith("guide,")
    import torch

    saved = torch.load(tmp_path / "python" / "checkpoint.pt", weights_only=False)  # the guide phase's, as run.py's
    assert saved["model_phase"]["steps"] == model_steps and all("phase" not in row for row in saved["history"])
    summarize(tmp_path, figures=False)
    rows = [line for line in (tmp_path / "summary.md").read_text().split("## By configuration")[1].splitlines()
            if line.startswith(f"| {name} ")]
    assert len(rows) == 1 and "| 2 |" in rows[0], rows  # one configuration, two seeds


def test_write_run_refuses_a_model_phase_that_did_not_train_the_model_by_its_exact_likelihood(tmp_path):
    from analysis.report import evaluate, write_run
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    first = fit(model, guide, data, steps=5, seed=0)
    result = fit(model, guide, data, steps=5, seed=0, freeze_model=True)
    metrics, grids = evaluate(model, guide, data, samples=1024, replicates=4, exact=False)
    with pytest.raises(ValueError, match=r"^model_phase=.* is not allowed: model_phase must be what fit\(model, None"):
        write_run(tmp_path / "run", model, guide, data, result, metrics, grids, figures=False, model_phase=first)
    assert not (tmp_path / "run").exists()


def test_evaluates_defaults_are_the_command_lines_eval_keys():
    from analysis.describe import cli_eval_defaults
    from analysis.report import evaluate

    params = inspect.signature(evaluate).parameters
    assert cli_eval_defaults() and {k: params[k].default for k in cli_eval_defaults()} == cli_eval_defaults()


def test_a_python_run_evaluated_with_other_settings_records_them_as_eval_overrides(tmp_path):
    import json

    from analysis.report import evaluate, write_run
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    result = fit(model, guide, data, steps=5, seed=0)
    metrics, grids = evaluate(model, guide, data, samples=10000, replicates=4)
    write_run(tmp_path / "run", model, guide, data, result, metrics, grids, figures=False)
    arguments = json.loads((tmp_path / "run" / "metrics.json").read_text())["arguments"]
    assert {k: v for k, v in arguments.items() if k.startswith("eval.")} == {"eval.samples": 10000,
                                                                              "eval.replicates": 4}


def test_a_run_that_composed_a_recipe_names_it_in_its_metrics(tmp_path):
    import json

    from conftest import run_cli

    proc = run_cli("objective=exact", "model=dlgm", "data.n=1", "objective.steps.dlgm=5", "train.steps=5",
                   "eval.samples=10000", "eval.replicates=2", "eval.figures=false",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["recipe"] == "conf/recipe/exact_dlgm.yaml"
    assert "arguments" not in metrics  # a command line's run: its overrides are in .hydra/, not re-derived


@pytest.mark.parametrize("objective", ["closed_form", "exact"])
def test_a_run_for_whose_objective_and_model_no_recipe_exists_names_none(tmp_path, objective):
    import json

    from conftest import run_cli

    proc = run_cli(f"objective={objective}", "model=vae", "data.n=1", "objective.steps.vae=5", "train.steps=5",
                   "eval.samples=10000", "eval.replicates=2", "eval.figures=false",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path) if objective == "exact" else run_cli(
        "data.n=1", "train.steps=5", "eval.samples=10000", "eval.replicates=2", "eval.figures=false",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "recipe" not in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_a_python_run_of_both_exact_phases_names_the_recipe_the_command_line_composes():
    from analysis.describe import describe
    from guides import StructuredGuide
    from infer import fit
    from infer.marginal import MarginalLikelihood
    from models import DLGM, OneBit

    data = OneBit(3)
    model = DLGM(data.n)
    guide = StructuredGuide(model)
    first = fit(model, None, data, elbo=MarginalLikelihood(nodes=8, inner_nodes=2), steps=2, seed=0)
    result = fit(model, guide, data, steps=2, seed=0, freeze_model=True)
    assert describe(model, guide, data, result, model_phase=first)["recipe"] == "conf/recipe/exact_dlgm.yaml"
    assert "recipe" not in describe(model, guide, data, result)  # the guide phase alone: closed_form, no recipe


@pytest.mark.parametrize("setting, value", [("lr", 1e-2), ("seed", 3), ("average", 0.5)])
def test_write_run_refuses_a_model_phase_trained_otherwise_than_the_command_lines(tmp_path, setting, value):
    from analysis.report import evaluate, write_run
    from guides import GaussianGuide
    from infer import fit
    from infer.marginal import MarginalLikelihood
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    first = fit(model, None, data, elbo=MarginalLikelihood(nodes=8, inner_nodes=2), steps=10, log_every=5,
                **{"seed": 0, setting: value})
    result = fit(model, guide, data, steps=10, seed=0, log_every=5, freeze_model=True)
    metrics, grids = evaluate(model, guide, data, samples=1024, replicates=4, exact=False)
    with pytest.raises(ValueError, match=rf"^model_phase is not allowed with these settings: .*{setting}="):
        write_run(tmp_path / "run", model, guide, data, result, metrics, grids, figures=False, model_phase=first)
    with pytest.raises(ValueError, match=r"^model_phase is not allowed with these settings"):
        evaluate(model, guide, data, samples=1024, replicates=4, exact=False, result=result, model_phase=first)
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_model_phase_without_the_guides_fit():
    from analysis.report import evaluate
    from guides import GaussianGuide
    from infer import fit
    from infer.marginal import MarginalLikelihood
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n)
    first = fit(model, None, data, elbo=MarginalLikelihood(nodes=8, inner_nodes=2), steps=5, seed=0)
    with pytest.raises(ValueError, match=r"^result=None is not allowed with model_phase"):
        evaluate(model, GaussianGuide(model), data, samples=1024, replicates=4, exact=False, model_phase=first)


def test_a_python_run_evaluated_with_another_seed_than_its_fits_records_it(tmp_path):
    import json

    from analysis.report import evaluate, write_run
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    result = fit(model, guide, data, steps=5, seed=2)
    metrics, grids = evaluate(model, guide, data, seed=0)  # the command line would evaluate with the run's seed, 2
    write_run(tmp_path / "run", model, guide, data, result, metrics, grids, figures=False)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["arguments"]["eval.seed"] == 0


def test_evaluate_given_a_fits_result_evaluates_with_the_runs_seed_as_the_command_line_does():
    from analysis.report import evaluate
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    result = fit(model, guide, data, steps=20, seed=2)
    default, _ = evaluate(model, guide, data, samples=1024, replicates=4, exact=False, result=result)
    seeded, _ = evaluate(model, guide, data, samples=1024, replicates=4, exact=False, seed=2)
    assert default["evaluation"]["seed"] == 2 and default["montecarlo"] == seeded["montecarlo"]


def test_a_python_run_on_other_data_weights_is_another_configuration_than_one_on_the_default_weights(tmp_path):
    import json

    from analysis.report import evaluate, write_run
    from analysis.sweep import summarize
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    for name, seed, weights in (("equal", 0, (0.5, 0.5)), ("unequal", 1, (0.3, 0.7))):
        data = OneBit(3, weights)
        model = VAE(data.n)
        guide = GaussianGuide(model)
        result = fit(model, guide, data, steps=5, seed=seed)
        metrics, grids = evaluate(model, guide, data, result=result)
        write_run(tmp_path / name, model, guide, data, result, metrics, grids, figures=False)
    arguments = json.loads((tmp_path / "unequal" / "metrics.json").read_text())["arguments"]
    assert arguments["data.weights"] == [0.3, 0.7]  # as `python run.py data.weights=[0.3,0.7]` records it
    assert "data.weights" not in json.loads((tmp_path / "equal" / "metrics.json").read_text())["arguments"]
    jobs = summarize(tmp_path, figures=False)["jobs"]
    assert jobs["duplicate_of"].isna().all()
    assert len((tmp_path / "summary_by_config.csv").read_text().strip().splitlines()) == 3  # header + 2 configurations


def test_a_python_run_warm_started_by_init_keep_is_not_labelled_as_the_command_lines_run_of_its_settings():
    from analysis.describe import describe
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    fresh = fit(model, guide, data, steps=5, seed=0)
    kept = fit(model, guide, data, steps=5, seed=0, init="keep")  # 10 steps in all, from the first fit's end
    assert "train.init" not in describe(model, guide, data, fresh).get("arguments", {})
    assert describe(model, guide, data, kept)["arguments"]["train.init"] == "keep"


def test_a_python_run_that_freezes_a_model_not_built_from_its_seed_is_not_labelled_as_the_command_lines():
    import pyro

    from analysis.describe import describe
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    data = OneBit(3)
    pyro.set_rng_seed(4)  # as the command line builds train.freeze_model=true seed=4's model
    model = VAE(data.n)
    guide = GaussianGuide(model)
    seeded = fit(model, guide, data, steps=5, seed=4, freeze_model=True)
    assert describe(model, guide, data, seeded)["arguments"] == {"train.steps": 5, "train.freeze_model": True}
    trained = VAE(data.n)
    fit(trained, GaussianGuide(trained), data, steps=5, seed=4)  # a model trained before: not the seed's
    guide = GaussianGuide(trained)
    frozen = fit(trained, guide, data, steps=5, seed=4, freeze_model=True)
    assert describe(trained, guide, data, frozen)["arguments"]["model.init"] == "given"


def test_a_python_runs_figures_carry_the_title_the_command_line_gives_its_run(tmp_path, monkeypatch):
    import analysis.figures
    import analysis.training_figure
    from analysis.report import evaluate, write_run
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    titles = []
    monkeypatch.setattr(analysis.figures, "encoding_figure", lambda *a, title=None, **k: titles.append(title))
    monkeypatch.setattr(analysis.training_figure, "training_figure", lambda *a, title=None, **k: titles.append(title))
    data = OneBit(3)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    result = fit(model, guide, data, steps=5, seed=2)
    metrics, grids = evaluate(model, guide, data, result=result)
    write_run(tmp_path / "run", model, guide, data, result, metrics, grids)
    assert titles == ["vae + gaussian, n=3, seed=2"] * 2  # cli.job's title for `python run.py data.n=3 seed=2`


def test_a_python_run_with_every_kl_sampled_records_objective_closed_form_false():
    from analysis.describe import describe
    from guides import GaussianGuide
    from infer import ClosedFormELBO, fit
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    result = fit(model, guide, data, steps=5, seed=0,
                 elbo=ClosedFormELBO(num_particles=32, noise="lattice", closed_form=False))
    assert describe(model, guide, data, result)["arguments"]["objective.closed_form"] is False


@pytest.mark.parametrize("setting, value", [("exact", False), ("khat_samples", 1000)])
def test_a_python_run_evaluated_with_a_setting_the_command_line_has_no_key_for_records_it(tmp_path, setting, value):
    import json

    from analysis.report import evaluate, write_run
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    result = fit(model, guide, data, steps=5, seed=0)
    metrics, grids = evaluate(model, guide, data, result=result, **{setting: value})
    write_run(tmp_path / "run", model, guide, data, result, metrics, grids, figures=False)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["evaluation"][setting] == value and written["arguments"][f"eval.{setting}"] == value


def test_the_command_line_refusing_a_checkpoint_fit_wrote_in_python_says_so_not_that_it_is_older(tmp_path):
    from conftest import run_cli

    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    model = VAE(3)
    fit(model, GaussianGuide(model), OneBit(3), steps=5, seed=0, checkpoint_path=tmp_path / "python.pt")
    proc = run_cli("data.n=3", "train.steps=10", f"train.resume={tmp_path / 'python.pt'}",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "written by fit() in Python" in proc.stderr and "older" not in proc.stderr


def test_a_python_run_whose_pyro_elbo_draws_particles_one_by_one_is_not_the_command_lines_objective_elbo():
    from pyro.infer import Trace_ELBO

    from analysis.describe import describe
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    data = OneBit(3)
    arguments = []
    for elbo in (Trace_ELBO(num_particles=32, vectorize_particles=True, max_plate_nesting=1),  # objective=elbo's
                 Trace_ELBO(num_particles=32)):  # Pyro's default: other draws, other numbers
        model = VAE(data.n)
        guide = GaussianGuide(model)
        arguments.append(describe(model, guide, data, fit(model, guide, data, steps=5, seed=0, elbo=elbo))["arguments"])
    assert "objective.vectorize_particles" not in arguments[0]
    assert arguments[1]["objective.vectorize_particles"] is False


def test_a_python_run_records_the_settings_it_ran_with_under_the_command_lines_keys(tmp_path):
    import json

    from analysis.report import evaluate, write_run
    from guides import GaussianGuide
    from infer import IWAE, fit
    from models import VAE, OneBit

    data = OneBit(3)
    model = VAE(data.n, hidden=16)
    guide = GaussianGuide(model)
    result = fit(model, guide, data, steps=5, seed=0, elbo=IWAE(num_particles=4))
    metrics, grids = evaluate(model, guide, data, result=result)
    write_run(tmp_path / "run", model, guide, data, result, metrics, grids, figures=False)
    settings = json.loads((tmp_path / "run" / "metrics.json").read_text())["settings"]
    assert {k: settings[k] for k in ("objective", "objective.K", "optim.lr", "train.steps", "model.hidden",
                                     "guide.hidden", "data.weights", "eval.samples", "replicas")} == {
        "objective": "iwae", "objective.K": 4, "optim.lr": 0.003, "train.steps": 5, "model.hidden": 16,
        "guide.hidden": 32, "data.weights": [0.5, 0.5], "eval.samples": 16384, "replicas": 1}
