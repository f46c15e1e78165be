"""The study's central numbers with the default training budget (slow: `pytest -m slow`, about 10 minutes).
Every check reads the exact (quadrature) numbers, not the Monte Carlo ones, which understate at large n."""
import math

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT

pytestmark = pytest.mark.slow


def train(tmp_path, *overrides):
    import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["eval.figures=false", *overrides])
    return run.run(cfg, tmp_path)


@pytest.mark.parametrize("model", ["vae", "dlgm"])
def test_at_n1_both_models_ignore_z(tmp_path, model):
    exact = train(tmp_path, f"model={model}", "data.n=1")["exact"]
    assert 0.690 <= exact["recon"] <= 0.697
    assert sum(exact["kl"].values()) < 0.005


def test_at_n5_the_vae_reaches_the_gaussian_family_optimum(tmp_path):
    metrics = train(tmp_path, "model=vae", "data.n=5")
    assert metrics["exact"]["loss"] <= 1.075
    assert metrics["gap_to_gaussian_optimum"] > -metrics["exact"]["error"] - 1e-6


def test_at_n5_the_dlgm_gets_close_to_ln2(tmp_path):
    assert train(tmp_path, "model=dlgm", "data.n=5")["exact"]["loss"] <= 0.73


def test_at_n1000_the_vae_reaches_its_target(tmp_path):
    assert train(tmp_path, "model=vae", "data.n=1000")["exact"]["loss"] <= 1.53


def test_at_n1000_the_dlgm_beats_the_vae_in_loss_and_recon(tmp_path):
    dlgm = train(tmp_path / "dlgm", "model=dlgm", "data.n=1000")["exact"]
    vae = train(tmp_path / "vae", "model=vae", "data.n=1000")["exact"]
    assert dlgm["loss"] <= 0.75
    assert dlgm["recon_per_dim"] < vae["recon_per_dim"]


def test_at_n1000_the_dlgm_nll_is_within_0_01_of_ln2_at_the_default_budget(tmp_path):
    # the recipe's 14000 steps give NLL 0.701-0.703 over seeds 0-4 (README); the loss keeps creeping down with training
    assert abs(train(tmp_path, "model=dlgm", "data.n=1000")["exact"]["nll"] - math.log(2)) < 0.01


def test_at_n5_no_seed_of_the_dlgm_collapses(tmp_path):
    """Seeds 0-7 trained together (replicas): none may end on the collapsed code, the vae's 1.0658 at n = 5 (a
    faster prior log-gain, rate 20 or 30, collapsed 2 of these 8 seeds)."""
    group = train(tmp_path, "model=dlgm", "data.n=5", "replicas=8")
    losses = [m["exact"]["loss"] for m in group["replicas"]]
    assert len(losses) == 8 and max(losses) <= 0.73, losses
