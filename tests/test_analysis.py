"""Analysis: Gaussian-family optimum, PSIS k-hat, ArviZ encodings, figures, sweep summaries, Hydra wiring."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from analysis.optimum import encoder, gaussian_loss, gaussian_optimum
from models import VAE, OneBit

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


class Collapsed(nn.Module):
    """A toy model whose decoder ignores z: the posterior p(z|x) is the prior N(0, 1)."""

    latent_sites = ("z",)

    def __init__(self, n):
        super().__init__()
        self.n, self.latent_dim = n, 1

    def forward(self, x):
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            logits = torch.zeros(x.shape[-1]) + 0.0 * z
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def normal_guide(scale):
    def guide(x):
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Normal(x.new_zeros(1), scale).to_event(1))
    return guide


def tiny_vae(n=5):
    from guides import GaussianGuide

    model = VAE(n, hidden=8, layers=1)
    return model, GaussianGuide(model, hidden=8, layers=1)


# --- Gaussian-family optimum -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, loss", [(2, 0.907558), (5, 1.065787), (1000, 1.500494)])
def test_optimum_matches_the_reference_losses(n, loss):
    assert gaussian_optimum(n)["loss"] == pytest.approx(loss, abs=1e-6)


def test_optimum_collapses_to_ln2_at_n1():
    opt = gaussian_optimum(1)
    assert opt["loss"] == pytest.approx(math.log(2), abs=1e-9)
    assert opt["a"] < 1e-3


def test_optimum_is_below_the_loss_of_every_a_on_a_grid():
    opt = gaussian_optimum(10)
    grid = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 60)])
    assert all(opt["loss"] <= gaussian_loss(a, 10) + 1e-12 for a in grid)


def test_optimum_encoder_has_the_kl_and_a_it_reports():
    opt = gaussian_optimum(100)
    m, s = opt["m"], opt["s"]
    assert 2 * m**2 / s**2 == pytest.approx(opt["a"], rel=1e-9)
    assert 0.5 * (m**2 + s**2 - 1 - math.log(s**2)) == pytest.approx(opt["kl"], abs=1e-12)
    assert (m, s) == encoder(opt["a"])


# --- PSIS k-hat --------------------------------------------------------------------------------------------------

def test_khat_is_small_when_the_guide_is_the_exact_posterior():
    from analysis.psis import GOOD, khat

    ks = khat(Collapsed(4), normal_guide(1.0), OneBit(4), samples=2000)
    assert len(ks) == 2 and all(k < GOOD for k in ks)


def test_khat_is_small_for_a_guide_wider_than_the_posterior():
    from analysis.psis import GOOD, khat

    ks = khat(Collapsed(4), normal_guide(1.3), OneBit(4), samples=4000)
    assert len(ks) == 2 and all(k < GOOD for k in ks)


def uniform_guide(x):
    """q(z|x_k) = Uniform(-1, 1): bounded weights (a good-looking k-hat) that never see the posterior's mass
    outside [-1, 1]."""
    with pyro.plate("data", x.shape[-2]):
        pyro.sample("z", dist.Uniform(-x.new_ones(1), x.new_ones(1)).to_event(1))


def test_a_guide_of_bounded_support_gets_no_nll_error_bar_from_importance_sampling():
    from analysis.iwae import iwae

    out = iwae(Collapsed(4), uniform_guide, OneBit(4), K=(1, 8), samples=4096, nll_samples=4096, seed=0)
    exact_nll = 4 * math.log(2)  # the collapsed model: p(x) = 2^-n whatever z
    inside = math.erf(1 / math.sqrt(2))  # the prior mass in [-1, 1]: the estimate is 0.38 above, no sampling error
    assert out["nll"] == pytest.approx(exact_nll - math.log(inside), abs=0.01)
    assert out["nll_se"] is None and "q(z) has support Interval where the model's z is real" in out["nll_note"]


def test_a_guide_of_bounded_support_gets_no_khat_verdict_and_its_summary_says_why():
    from analysis.report import evaluate
    from analysis.summary_text import summary_lines

    model, _ = tiny_vae()
    metrics, _ = evaluate(model, uniform_guide, OneBit(5), samples=2048, replicates=2, seed=0)
    assert metrics["psis"]["narrow"] and all(v.startswith("not informative") for v in metrics["psis"]["verdict"])
    line = next(v for v in summary_lines(metrics) if "PSIS k-hat" in v)
    assert "not informative: q(z) has support Interval" in line and "good" not in line


def test_a_guide_with_the_models_support_is_judged_by_its_khat():
    from analysis.psis import narrow_support, sample_traces

    assert narrow_support(*sample_traces(Collapsed(4), normal_guide(1.0), OneBit(4).x, 8)) == ""


def test_khat_is_large_for_a_guide_narrower_than_the_posterior():
    from analysis.psis import BAD, khat

    ks = khat(Collapsed(4), normal_guide(0.3), OneBit(4), samples=4000)
    assert all(k > BAD for k in ks)


# --- encodings ---------------------------------------------------------------------------------------------------

def test_encodings_round_trip_through_netcdf_with_dims_and_coords(tmp_path):
    from analysis.encodings import GROUP_EXACT, encodings, load, save

    model, guide = tiny_vae()
    grid = np.linspace(-3, 3, 31)
    grids = {"z": {"grid": grid, "prior": np.exp(-grid**2 / 2), "q": np.ones((2, 31)),
                   "aggregate": np.ones(31), "posterior": np.ones((2, 31))}}
    idata = encodings(model, guide, OneBit(5), samples=50, grids=grids)
    back = load(save(idata, tmp_path / "encodings.nc"))
    z = back.posterior["z"]
    assert z.dims == ("chain", "draw", "x", "z_dim") and z.shape == (1, 50, 2, 1)
    assert list(back.posterior["x"].values) == ["x0=0^n", "x1=1^n"]
    assert back.prior["z"].dims == ("chain", "draw", "z_dim")
    assert back[GROUP_EXACT]["z_q"].dims == ("x", "z_grid")
    assert back.attrs["latent_sites"] == ["z"] and int(back.attrs["n"]) == 5


def test_encodings_summary_has_mean_sd_and_hdi():
    from analysis.encodings import encodings, summary

    model, guide = tiny_vae()
    table = summary(encodings(model, guide, OneBit(5), samples=50))
    assert {"mean", "sd", "hdi_3%", "hdi_97%"} <= set(table.columns) and len(table) == 3


# --- figures -----------------------------------------------------------------------------------------------------

def test_encoding_and_training_figures_write_png(tmp_path):
    from analysis.encodings import encodings
    from analysis.figures import encoding_figure
    from analysis.training_figure import training_figure

    model, guide = tiny_vae()
    encoding_figure(encodings(model, guide, OneBit(5), samples=100), tmp_path / "enc.png")
    history = [{"step": s, "lr": 1e-3, "loss": 2.0 / s + 0.7, "recon": 1.0 / s, "kl_z1": -0.1, "kl_z2": 0.5}
               for s in range(1, 21)]
    training_figure(history, tmp_path / "train.png", floor=math.log(2))
    for name in ("enc.png", "train.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_the_training_figure_is_headed_by_its_title_and_shows_an_objective_that_is_not_the_loss():
    from analysis.training_figure import training_figure

    history = [{"step": s, "lr": 1e-3, "loss": 2.0 / s + 0.7, "recon": 1.0 / s, "rate_z": 0.5,
                "objective": 1.0 / s + 0.6} for s in range(1, 21)]
    fig = training_figure(history, title="vae + gaussian, n=5, seed=0", objective=True)
    assert fig._suptitle.get_text() == "vae + gaussian, n=5, seed=0"
    assert "objective (minimised)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plain = training_figure(history)  # a plain ELBO run: its objective is an estimate of the same loss
    assert "objective (minimised)" not in [t.get_text() for t in plain.axes[0].get_legend().get_texts()]


def test_the_training_figure_says_its_loss_is_window_means_of_the_training_estimate_with_its_tag():
    from analysis.training_figure import training_figure

    history = [{"step": s, "lr": 1e-3, "loss": 2.0 / s + 0.7, "recon": 1.0 / s, "rate_z": 0.5} for s in range(1, 21)]
    tagged = training_figure(history, estimator="RQMC lattice").axes[0].get_title()
    assert tagged.endswith("window means of the training estimate [RQMC lattice]")
    assert training_figure(history).axes[0].get_title().endswith("window means of the training estimate")


def test_a_runs_training_estimator_is_the_tag_of_the_draws_it_trained_with():
    from types import SimpleNamespace

    from analysis.run_outputs import training_estimator

    assert training_estimator(SimpleNamespace(recipe={"noise": "lattice"})) == "RQMC lattice"
    assert training_estimator(SimpleNamespace(recipe={"noise": "mc"})) == "MC"
    assert training_estimator(SimpleNamespace(recipe={})) is None  # a Pyro ELBO of the user's: not said


# --- sweep summaries ---------------------------------------------------------------------------------------------

def fake_job(sweep, n, seed, loss=None, model="vae"):
    job = sweep / f"data.n={n},model={model},seed={seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- model={model}\n- data.n={n}\n- seed={seed}\n")
    (job / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\ndata:\n  n: {n}\nmodel:\n  name: {model}\nguide:\n  name: gaussian\n")
    if loss is not None:
        (job / "metrics.json").write_text(json.dumps({
            "model": model, "guide": "gaussian", "n": n, "seed": seed, "steps": 10, "wall_seconds": 1.0,
            "loss": loss, "loss_se": 0.01, "recon": 0.1, "recon_per_dim": 0.1 / n, "kl": {"z": loss - 0.1},
            "estimator": "Monte Carlo", "khat": [0.2, 0.3]}))
    return job


def test_summarize_lists_a_failed_job(tmp_path):
    from analysis.sweep import summarize

    fake_job(tmp_path, 5, 0, loss=1.1)
    fake_job(tmp_path, 5, 1)  # no metrics.json: failed
    result = summarize(tmp_path, figures=False)
    md = (tmp_path / "summary.md").read_text()
    assert "FAILED `data.n=5,model=vae,seed=1`" in md
    assert result["failed"] == ["data.n=5,model=vae,seed=1"]
    import pandas as pd

    jobs = pd.read_csv(tmp_path / "summary.csv")
    assert sorted(jobs["status"]) == ["failed", "ok"]


def test_summarize_aggregates_seeds_as_mean_and_sd(tmp_path):
    from analysis.sweep import summarize

    fake_job(tmp_path, 5, 0, loss=1.0)
    fake_job(tmp_path, 5, 1, loss=1.2)
    agg = summarize(tmp_path, figures=False)["aggregated"]
    row = agg.iloc[0]
    assert len(agg) == 1 and row["seeds"] == 2
    assert row["loss_mean"] == pytest.approx(1.1) and row["loss_sd"] == pytest.approx(math.sqrt(0.02))
    assert "1.1000 ± 0.1414" in (tmp_path / "summary.md").read_text()


def test_summarize_lists_jobs_of_multirun_yaml_without_a_directory(tmp_path):
    from analysis.sweep import summarize

    fake_job(tmp_path, 5, 0, loss=1.0)
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      seed: 0,1\n  overrides:\n    task:\n    - model=vae\n    - data.n=5\n")
    result = summarize(tmp_path, figures=False)
    assert result["missing"] == ["seed=1 model=vae data.n=5"]
    assert "MISSING seed=1 model=vae data.n=5" in (tmp_path / "summary.md").read_text()


def test_summarize_writes_the_sweep_figures(tmp_path):
    from analysis.encodings import encodings, save
    from analysis.sweep import summarize

    model, guide = tiny_vae(5)
    job = fake_job(tmp_path, 5, 0, loss=1.1)
    save(encodings(model, guide, OneBit(5), samples=100), job / "encodings.nc")
    fake_job(tmp_path, 10, 0, loss=1.2)
    summarize(tmp_path)
    for name in ("loss_vs_n.png", "recon_per_dim_vs_n.png", "encodings_grid.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


# --- Hydra wiring ------------------------------------------------------------------------------------------------

def test_callback_module_imports_nothing_heavy():
    code = ("import sys, analysis.callbacks; heavy = {'torch', 'pyro', 'matplotlib', 'arviz', 'pandas', 'scipy'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_study_experiment_sweeps_models_and_n_with_three_seeds_as_replicas():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=study"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert sorted(params["model"].split(",")) == ["dlgm", "vae"]
    assert sorted(int(n) for n in params["data.n"].split(",")) == [1, 5, 10, 100, 1000]
    assert "seed" not in params and cfg.seed == 0 and cfg.replicas == 3


# --- k-hat with its meaning --------------------------------------------------------------------------------------

def test_the_khat_threshold_depends_on_the_sample_size():
    from analysis.psis import threshold

    assert threshold(100) == pytest.approx(0.5)
    assert threshold(2000) == pytest.approx(1 - 1 / math.log10(2000))
    assert threshold(10 ** 6) == 0.7


def test_nearly_constant_weights_are_named_instead_of_judged_by_khat():
    from analysis.psis import diagnose

    lw = np.random.default_rng(0).normal(scale=0.004, size=(1, 16384))  # the vae at n = 1: ESS/S = 0.99998
    d = diagnose(lw)[0]
    assert d["ess_fraction"] > 0.999 and "nearly constant" in d["verdict"]


def test_khat_comes_with_its_ess_and_sampling_sd():
    from analysis.psis import diagnose

    lw = np.random.default_rng(0).normal(scale=2.0, size=(2, 16384))
    for d in diagnose(lw):
        assert 0 < d["ess"] < 16384 and 0.05 < d["sd"] < 0.15 and d["threshold"] == 0.7


def test_tail_khat_tells_finite_from_infinite_variance():
    from analysis.psis import tail_khat

    rng = np.random.default_rng(1)
    assert tail_khat(rng.normal(size=16384)) < 0.5
    assert tail_khat(rng.pareto(1 / 0.8, size=16384)) > 0.5  # shape 0.8: infinite variance
    assert tail_khat(-rng.pareto(1 / 0.8, size=16384)) > 0.5  # a heavy lower tail counts too
    assert tail_khat(np.ones(100)) == 0.0


# --- importance sampling for joint guides ------------------------------------------------------------------------

def wide_joint_guide(model, data, scale=1.5):
    """AutoDiagonalNormal over both points' latents, centred at 0 and wider than the (near-prior) posterior: light
    tailed importance weights."""
    from pyro.infer.autoguide import AutoDiagonalNormal

    guide = AutoDiagonalNormal(model)
    guide(data.x)
    with torch.no_grad():
        guide.loc.zero_()
    guide.scale = torch.full_like(guide.scale, scale)
    return guide


def test_joint_importance_weights_estimate_the_exact_evidence():
    from analysis.exact import evidence
    from analysis.iwae import iwae
    from guides import StructuredGuide
    from models import DLGM

    pyro.set_rng_seed(0)
    data = OneBit(5)
    model = DLGM(5, hidden=8, prior_hidden=8)
    truth = evidence(model, StructuredGuide(model), data)["nll"]
    r = iwae(model, wide_joint_guide(model, data), data, K=(1, 64), samples=8192, nll_samples=32768, seed=0)
    assert r["joint"] and r["nll_se"] is not None
    assert abs(r["nll"] - truth) < 4 * r["nll_se"] + 1e-4
    assert r["bounds"][1]["loss"] > r["bounds"][64]["loss"] > truth - 4 * r["bounds"][64]["se"]


def test_heavy_tailed_importance_weights_get_no_standard_error_but_a_note():
    from analysis.iwae import iwae

    r = iwae(Collapsed(4), normal_guide(0.3), OneBit(4), K=(1, 16), samples=4096, nll_samples=16384, seed=0)
    assert r["nll_se"] is None and r["log_px_se"] is None
    assert "heavy tail" in r["nll_note"] and "unreliable" in r["nll_note"]


def test_an_iwae_bounds_error_bar_is_the_skew_corrected_standard_error_of_its_repeats(monkeypatch):
    """As RQMC's replicate means, the repeats of log mean_K w are skewed where a rare large weight is hit or
    missed: their ± is montecarlo.replicate_se's (Student-t, Hall's skew correction), wider than s / sqrt(R)."""
    import analysis.iwae as iwae_module
    from analysis.montecarlo import replicate_se

    data = OneBit(4)
    lw = torch.zeros(65, 2, dtype=torch.float64)
    lw[:3] = 6.0  # three repeats hit a large weight: a skewed sample of 65 repeats (K = 1)
    monkeypatch.setattr(iwae_module, "log_weights", lambda model, guide, x, samples, chunk, beta: lw[:samples])
    out = iwae_module.bound(None, None, data, K=1, samples=65)
    loss = -(lw * data.w.double()).sum(1)
    assert out["se"] == pytest.approx(replicate_se(loss), rel=1e-12)
    assert out["se"] > 1.1 * float(loss.std()) / math.sqrt(65)
