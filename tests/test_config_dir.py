"""--config-dir <dir> adds config groups of one's own: their options are chosen, checked and run as the built-in
ones are (the preflight composes with the dir on the search path), and a sweep summary never takes an option of
one's own for a built-in option of the same name."""
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from test_cli_integrity import TINY, one_line_error

WIDE_VAE = """# @package _global_
defaults:
  - override /guide: gaussian
model:
  name: vae
  _target_: models.VAE
  latent_dim: 1
  hidden: 48
  layers: 2
  activation: elu
  gain: true
"""


@pytest.fixture
def config_dir(tmp_path) -> Path:
    """A directory with one model option of its own, model=widevae (the vae, 48 wide)."""
    folder = tmp_path / "myconf"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "widevae.yaml").write_text(WIDE_VAE)
    return folder


def test_an_option_of_ones_own_trains(tmp_path, config_dir):
    proc = run_cli("--config-dir", str(config_dir), "model=widevae", *TINY, "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert config.model.hidden == 48
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "ok"


def test_a_bad_value_under_config_dir_leaves_no_run_dir(tmp_path, config_dir):
    proc = run_cli("--config-dir", str(config_dir), "model=widevae", *TINY, "train.steps=-1", "hydra.run.dir=run",
                   cwd=tmp_path)
    one_line_error(proc, "train.steps=-1 is not allowed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myconf"]


def test_an_unknown_option_names_those_of_the_config_dir_too(tmp_path, config_dir):
    proc = run_cli("--config-dir", str(config_dir), "model=nosuch", *TINY, cwd=tmp_path)
    one_line_error(proc, "model=nosuch is not allowed: model must be one of dlgm, vae, widevae")


def test_an_option_whose_keys_its_target_does_not_take_is_refused_before_training(tmp_path, config_dir):
    (config_dir / "model" / "widevae.yaml").write_text(WIDE_VAE + "  min_scale: 1.0e-5\n")
    proc = run_cli("--config-dir", str(config_dir), "model=widevae", *TINY, "hydra.run.dir=run", cwd=tmp_path)
    one_line_error(proc, "model=widevae does not fit models.VAE", "min_scale", "latent_dim, hidden")
    assert not (tmp_path / "run").exists()


def test_an_option_whose_target_cannot_be_imported_is_refused_in_one_line(tmp_path, config_dir):
    (config_dir / "model" / "widevae.yaml").write_text(WIDE_VAE.replace("models.VAE", "mypackage.NoSuchModel"))
    proc = run_cli("--config-dir", str(config_dir), "model=widevae", *TINY, "hydra.run.dir=run", cwd=tmp_path)
    one_line_error(proc, "model._target_=mypackage.NoSuchModel cannot be imported")
    assert not (tmp_path / "run").exists()


def test_printing_the_config_checks_the_values_of_an_option_of_ones_own(tmp_path, config_dir):
    proc = run_cli("--cfg", "job", "--config-dir", str(config_dir), "model=widevae", "data.n=-1", cwd=tmp_path)
    one_line_error(proc, "data.n=-1 is not allowed")


def test_a_sweep_summary_keeps_an_option_of_ones_own_apart_from_the_built_in_one_it_is_named_as():
    from analysis.aggregate import tables

    rows = [{"job": f"model={option}", "status": "ok", "model": "vae", "guide": "gaussian", "n": 5, "seed": 0,
             "loss": loss, "_overrides": {"model": option}} for option, loss in (("vae", 1.0), ("widevae", 2.0))]
    jobs, agg = tables(rows)
    assert jobs["duplicate_of"].isna().all()  # not one run twice
    assert sorted(agg["override:model"]) == ["vae", "widevae"] and sorted(agg["loss_mean"]) == [1.0, 2.0]


def test_a_sweep_of_built_in_options_has_no_option_column():
    from analysis.aggregate import tables

    rows = [{"job": f"model={m}", "status": "ok", "model": m, "guide": "gaussian", "n": 5, "seed": 0, "loss": 1.0,
             "_overrides": {"model": m}} for m in ("vae", "dlgm")]
    _, agg = tables(rows)
    assert "override:model" not in agg


def test_a_recipe_of_ones_own_is_composed_and_named_by_its_path(tmp_path):
    folder = tmp_path / "myconf"
    (folder / "recipe").mkdir(parents=True)
    (folder / "recipe" / "exact_vae.yaml").write_text("# @package _global_\nmodel:\n  hidden: 40\n")
    proc = run_cli("--config-dir", str(folder), "objective=exact", "objective.steps.vae=5", *TINY, "hydra.run.dir=run",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml").model.hidden == 40
    recipe = json.loads((tmp_path / "run" / "metrics.json").read_text())["recipe"]
    assert Path(recipe) == folder / "recipe" / "exact_vae.yaml"


def test_an_option_of_ones_own_without_a_name_is_refused_naming_the_option_and_the_key(tmp_path):
    # the run dir's name reads it: "Interpolation key 'guide.name' not found full_key: hydra.run.dir"
    (tmp_path / "conf" / "guide").mkdir(parents=True)
    (tmp_path / "conf" / "guide" / "noname.yaml").write_text("_target_: guides.GaussianGuide\nhidden: 8\n")
    proc = run_cli("--config-dir", str(tmp_path / "conf"), *TINY, "guide=noname", cwd=tmp_path)
    one_line_error(proc, "guide.name is not set by guide=noname", "must name itself (e.g. name: noname")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]
