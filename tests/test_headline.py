"""The headline a user sees first: metrics['loss'] is the most accurate estimate the run has and names it; a Monte
Carlo number carries an error bar only where the tail of its per-sample values allows one; summaries print only what
is known."""
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from analysis.exact import exact
from analysis.montecarlo import MAX_ELEMENTS, monte_carlo, particles_per_chunk
from analysis.report import evaluate, summary_lines, write_run
from guides import GaussianGuide, StructuredGuide
from models import DLGM, VAE, OneBit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vae5():
    pyro.set_rng_seed(0)
    model = VAE(5, hidden=8, layers=1)
    return model, GaussianGuide(model, hidden=8, layers=1), OneBit(5)


@pytest.fixture(scope="module")
def dlgm5():
    pyro.set_rng_seed(3)
    model = DLGM(5, hidden=8, prior_hidden=8)
    return model, StructuredGuide(model), OneBit(5)


@pytest.fixture(scope="module")
def exact_of(vae5, dlgm5):
    return {"vae5": exact(*vae5), "dlgm5": exact(*dlgm5)}


@pytest.fixture(scope="module")
def vae5_metrics(vae5):
    return evaluate(*vae5, samples=2048, replicates=4)[0]


# --- the headline ------------------------------------------------------------------------------------------------

def test_the_headline_is_the_exact_loss_where_quadrature_runs(vae5_metrics):
    m = vae5_metrics
    assert m["loss"] == m["exact"]["loss"] and m["loss_estimator"] == "exact"
    assert m["loss_se"] is None and m["loss_error"] == m["exact"]["error"]
    assert m["recon"] == m["exact"]["recon"] and m["kl"] == m["exact"]["kl"]
    assert m["estimator"] == m["exact"]["estimator"]


def test_an_evaluation_asked_for_no_quadrature_says_so_in_its_metrics_and_its_summary(vae5):
    m, _ = evaluate(*vae5, samples=1024, replicates=4, exact=False)
    assert "exact" not in m and m["loss_estimator"] != "exact"
    assert m["exact_skipped"] == "not asked for (evaluate(..., exact=False))"
    assert "  exact      skipped: not asked for (evaluate(..., exact=False))" in summary_lines(m)


def test_the_monte_carlo_numbers_stay_in_their_own_block(vae5_metrics):
    mc = vae5_metrics["montecarlo"]
    assert mc["kind"] == "RQMC lattice" and {"loss", "recon", "kl", "tail_khat", "estimator"} <= set(mc)
    assert mc["loss"] != vae5_metrics["loss"]


def test_the_headline_is_monte_carlo_where_quadrature_does_not_run(vae5):
    m, _ = evaluate(*vae5, samples=2048, replicates=4, exact=False)
    assert m["loss"] == m["montecarlo"]["loss"] and m["loss_estimator"] == "RQMC lattice"
    assert m["loss_se"] == m["montecarlo"]["loss_se"]


def test_metrics_survive_json(vae5_metrics):
    assert json.loads(json.dumps(vae5_metrics)) == vae5_metrics


# --- Monte Carlo error bars against the exact value -------------------------------------------------------------

def within_error_or_flagged(mc, ex):
    """The Monte Carlo loss is within 4 reported standard errors (plus the quadrature's own error) of the exact
    loss, or it carries no standard error and says why."""
    if mc["loss_se"] is None:
        return "heavy tail" in mc["loss_note"]
    return abs(mc["loss"] - ex["loss"]) < 4 * mc["loss_se"] + ex["error"]


@pytest.mark.parametrize("noise", ["lattice", "qmc", "mc"])
@pytest.mark.parametrize("pair", ["vae5", "dlgm5"])
def test_a_monte_carlo_loss_is_within_four_se_of_the_exact_one_or_flagged(pair, noise, request, exact_of):
    model, guide, data = request.getfixturevalue(pair)
    ex = exact_of[pair]
    for seed in range(3):
        torch.manual_seed(seed)
        mc = monte_carlo(model, guide, data, samples=4096, replicates=16, noise=noise)
        assert within_error_or_flagged(mc, ex), (seed, mc["loss"], mc["loss_se"], ex["loss"])


def test_the_lattice_rule_reaches_the_costly_tail_at_n1000():
    """At n = 1000 a steep decoder makes rare z near the decision boundary cost hundreds of nats: the lattice puts
    particles there every replicate and matches quadrature to its stated error."""
    pyro.set_rng_seed(0)
    data = OneBit(1000)
    model = VAE(data.n, hidden=8, layers=1)
    guide = GaussianGuide(model, hidden=8, layers=1)
    ex = exact(model, guide, data)
    mc = monte_carlo(model, guide, data, samples=4096, replicates=8, noise="lattice")
    assert mc["loss_se"] is not None and within_error_or_flagged(mc, ex)


def test_a_one_dimensional_lattice_is_a_quadrature_rule_with_no_tail_to_diagnose(vae5, dlgm5):
    torch.manual_seed(0)
    one = monte_carlo(*vae5, samples=1024, replicates=4)
    two = monte_carlo(*dlgm5, samples=1024, replicates=4)
    assert one["tail_khat"] is None and "bounded weights" in one["tail_note"] and one["loss_se"] > 0
    assert two["tail_khat"] is not None and "tail_note" not in two  # z2's noise is Sobol: its tail is diagnosed


class Cliff(nn.Module):
    """A toy whose recon grows like exp(a z^2 / 2) under q = N(0, 1): the per-sample loss has a Pareto tail of
    shape a (infinite variance for a > 1/2), the regime where a CLT standard error does not hold."""

    def __init__(self, a=0.8, n=4):
        super().__init__()
        self.a, self.n = a, n

    def forward(self, x):
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            logits = -torch.exp(self.a * z ** 2 / 2) * (2 * x - 1)  # each bit pays about exp(a z^2 / 2)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def standard_normal_guide(x):
    with pyro.plate("data", x.shape[-2]):
        pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))


@pytest.mark.parametrize("noise", ["qmc", "mc"])
def test_a_heavy_tailed_per_sample_loss_gets_no_standard_error_but_a_note(noise):
    torch.manual_seed(0)
    mc = monte_carlo(Cliff(0.8), standard_normal_guide, OneBit(4), samples=8192, replicates=8, noise=noise)
    assert mc["loss_se"] is None and mc["recon_se"] is None
    assert mc["tail_khat"] > 0.5 and "variance may be infinite" in mc["loss_note"]


def test_a_light_tailed_per_sample_loss_keeps_its_standard_error():
    torch.manual_seed(0)
    mc = monte_carlo(Cliff(0.1), standard_normal_guide, OneBit(4), samples=8192, replicates=8, noise="qmc")
    assert mc["tail_khat"] < 0.5 and mc["loss_se"] > 0 and "loss_note" not in mc


def laplace_guide(data):
    """q(z|x_k) = Laplace(loc_k, 0.5): no Gaussian site and no flow, so no site takes the lattice or Sobol points."""
    loc = torch.tensor([[-1.0], [1.0]])

    def guide(x):
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Laplace(loc, 0.5).to_event(1))

    return guide


@pytest.mark.parametrize("noise", ["lattice", "qmc"])
def test_a_guide_no_site_of_which_takes_the_points_is_labelled_plain_monte_carlo(vae5, noise):
    model, _, data = vae5
    torch.manual_seed(0)
    mc = monte_carlo(model, laplace_guide(data), data, samples=1024, replicates=4, noise=noise)
    assert mc["kind"] == "MC"
    assert mc["estimator"].startswith(f"Monte Carlo (i.i.d. draws: noise={noise} was asked, but no guide site is "
                                      "Gaussian")


def test_plain_monte_carlo_draws_get_the_standard_error_of_the_draws(vae5, monkeypatch):
    import analysis.montecarlo as montecarlo

    model, _, data = vae5
    called = []
    monkeypatch.setattr(montecarlo, "replicate_se", lambda *a, **k: called.append(1) or 1.0)
    torch.manual_seed(0)
    mc = monte_carlo(model, laplace_guide(data), data, samples=1024, replicates=4, noise="lattice")
    assert not called and mc["loss_se"] is not None and mc["loss_se"] != 1.0


def test_a_run_whose_draws_were_plain_monte_carlo_has_its_headline_labelled_so(vae5):
    model, _, data = vae5
    m, _ = evaluate(model, laplace_guide(data), data, samples=1024, replicates=4, exact=False)
    assert m["loss_estimator"] == "MC" and m["estimator"].startswith("Monte Carlo (i.i.d. draws")
    assert "[MC]" in summary_lines(m)[1] and "RQMC" not in "\n".join(summary_lines(m))


def gaussian_and_laplace_guide():
    """q(z1|x_k) = Normal(loc_k, 0.5), q(z2|x_k) = Laplace(loc_k, 0.5): one site takes the points, one cannot."""
    loc = torch.tensor([[-1.0], [1.0]])

    def guide(x):
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z1", dist.Normal(loc, 0.5).to_event(1))
            pyro.sample("z2", dist.Laplace(loc, 0.5).to_event(1))

    return guide


def test_a_guide_with_sites_the_points_cannot_drive_beside_ones_they_do_names_them_in_its_estimator(dlgm5):
    model, _, data = dlgm5
    torch.manual_seed(0)
    mc = monte_carlo(model, gaussian_and_laplace_guide(), data, samples=1024, replicates=4, noise="lattice")
    assert mc["kind"] == "RQMC lattice"
    assert "1 other guide site drawn i.i.d. within each replicate" in mc["estimator"]


def test_a_gaussian_site_wider_than_the_points_is_named_as_drawn_iid_for_its_width(dlgm5):
    """A dlgm with 10 scalars per latent: z1 takes 10 of the 16 coordinates, Gaussian z2 needs 10 more."""
    from guides import StructuredGuide
    from models import DLGM

    model = DLGM(5, latent_dim=10)
    torch.manual_seed(0)
    mc = monte_carlo(model, StructuredGuide(model), dlgm5[2], samples=1024, replicates=4, noise="lattice")
    assert mc["kind"] == "RQMC lattice" and "for the Gaussian and flow guide sites" not in mc["estimator"]
    assert ("1 other guide site drawn i.i.d. within each replicate (not Gaussian nor a flow over a Gaussian base, or "
            "past the points' 16 coordinates") in mc["estimator"]


def test_a_gaussian_guide_too_wide_for_the_points_is_labelled_plain_monte_carlo_for_its_width(vae5):
    from guides import GaussianGuide
    from models import VAE

    model = VAE(5, latent_dim=20)
    torch.manual_seed(0)
    mc = monte_carlo(model, GaussianGuide(model), vae5[2], samples=1024, replicates=4, noise="lattice")
    assert mc["kind"] == "MC"
    assert "no guide site is Gaussian or a flow over a Gaussian base of at most 16 scalars" in mc["estimator"]


def test_a_guide_whose_every_site_takes_the_points_names_no_iid_site(dlgm5):
    torch.manual_seed(0)
    mc = monte_carlo(*dlgm5, samples=1024, replicates=4, noise="lattice")
    assert "i.i.d." not in mc["estimator"]


# --- bounded memory ----------------------------------------------------------------------------------------------

def test_a_chunk_holds_at_most_max_elements_values_for_any_n():
    for n in (1, 1000, 10 ** 6, 10 ** 8):
        assert particles_per_chunk(n) >= 1
        assert particles_per_chunk(n) * 2 * n <= MAX_ELEMENTS or particles_per_chunk(n) == 1
    assert particles_per_chunk(10 ** 6) == 16


@pytest.mark.parametrize("noise", ["lattice", "qmc"])
def test_chunking_does_not_change_the_estimate(vae5, noise):
    model, guide, data = vae5
    results = []
    for max_elements in (MAX_ELEMENTS, 2 * 5 * 7):  # one chunk per replicate, then 7 particles per chunk
        torch.manual_seed(1)
        results.append(monte_carlo(model, guide, data, samples=256, replicates=4, noise=noise,
                                   max_elements=max_elements))
    # the same draws: equal up to float32 rounding (a matmul's blocking depends on the batch size)
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-7)
    assert results[0]["loss_se"] == pytest.approx(results[1]["loss_se"], rel=1e-3)


# --- summaries ---------------------------------------------------------------------------------------------------

def test_a_summary_of_evaluate_alone_prints_no_unknowns(vae5_metrics):
    head = summary_lines(vae5_metrics)[0]
    assert "?" not in head and "steps" not in head and "evaluation" in head


def test_the_first_number_of_a_summary_is_the_headline_loss_and_names_it(vae5_metrics):
    line = summary_lines(vae5_metrics)[1]
    assert line.split()[:3] == ["loss", f"{vae5_metrics['loss']:.4f}", "[exact]"]


def test_a_run_below_the_gaussian_optimum_is_said_to_be_below_it(vae5_metrics):
    m = {**vae5_metrics, "gaussian_optimum": 1.2, "gap_to_gaussian_optimum": -0.2}
    line = next(s for s in summary_lines(m) if "optimum" in s)
    assert "this run is 0.2000 [exact] below it" in line and "-0.2" not in line


@pytest.fixture(scope="module")
def vae5_mc_metrics(vae5):
    return evaluate(*vae5, samples=1024, replicates=4, noise="mc", exact=False)[0]


def test_the_gap_to_the_gaussian_optimum_of_a_monte_carlo_headline_has_its_tag_and_error_bar(vae5_mc_metrics):
    m = {**vae5_mc_metrics, "loss_se": 0.0051, "gaussian_optimum": 1.0, "gap_to_gaussian_optimum": 0.0449}
    line = next(s for s in summary_lines(m) if "optimum" in s)
    assert line.endswith("this run is 0.0449 ± 0.0051 [MC] above it")


def test_the_gap_of_a_monte_carlo_headline_without_an_error_bar_is_not_shown(vae5_mc_metrics):
    m = {**vae5_mc_metrics, "loss_se": None, "gaussian_optimum": 1.0, "gap_to_gaussian_optimum": 0.0449}
    line = next(s for s in summary_lines(m) if "optimum" in s)
    assert "0.0449" not in line and "no gap shown: the loss [MC] it would come from has no error bar" in line


def test_a_run_trained_with_a_kl_weight_says_its_objective_was_not_the_loss_reported(vae5_metrics):
    lines = summary_lines({**vae5_metrics, "beta": 0.25})
    assert "beta=0.25" in lines[1] and "recon + 0.25 KL" in lines[1] and "did not minimise" in lines[1]
    assert lines[2].split()[:3] == ["loss", f"{vae5_metrics['loss']:.4f}", "[exact]"]


def test_a_run_at_kl_weight_one_has_no_kl_weight_line(vae5_metrics):
    assert not any("beta" in line for line in summary_lines({**vae5_metrics, "beta": 1.0}))


def test_the_command_line_records_a_kl_weight_other_than_one_and_only_then():
    from cli.job import objective_facts

    assert objective_facts(_cfg(beta=0.5)) == {"beta": 0.5}
    assert objective_facts(_cfg()) == {}


def _cfg(beta=1.0, warmup=0, steps=300, objective="closed_form", **options):
    from omegaconf import OmegaConf

    return OmegaConf.create({"train": {"beta": beta, "warmup": warmup, "warmup_start": 0.0, "steps": steps},
                             "objective": {"name": objective, "free_bits": 0.0, **options}})


def test_a_warmup_longer_than_the_run_is_recorded_with_the_last_steps_kl_weight():
    from cli.job import objective_facts

    facts = objective_facts(_cfg(warmup=1000, steps=300))
    assert facts == {"kl_weight_final": pytest.approx(299 / 1000), "warmup": 1000}
    assert objective_facts(_cfg(warmup=300, steps=300)) == {"kl_weight_final": pytest.approx(299 / 300),
                                                            "warmup": 300}  # its last step's weight: 299/300
    assert objective_facts(_cfg(warmup=300, steps=301)) == {}  # the last step trained at beta


def test_free_bits_and_the_iwae_bound_are_recorded_as_what_the_run_minimised():
    from cli.job import objective_facts

    assert objective_facts(_cfg(free_bits=0.5)) == {"free_bits": 0.5}
    assert objective_facts(_cfg(objective="iwae", K=16)) == {"iwae_K": 16}


@pytest.mark.parametrize("facts, text", [
    ({"beta": 0.5}, "trained on KL weight beta=0.5 (recon + 0.5 KL): the loss below is the ELBO's"),
    ({"iwae_K": 16}, "trained on the IWAE-16 bound (objective=iwae): the loss below is the ELBO's"),
    ({"kl_weight_final": 0.299, "warmup": 1000}, "a KL weight still rising at its last step, 0.299 (its warm-up, 1000 "
                                                 "steps, had not ended"),
    ({"free_bits": 0.5}, "free bits 0.5 (each latent site's KL term floored at 0.5 nats)"),
], ids=["beta", "iwae", "warmup", "free_bits"])
def test_the_summary_says_what_the_run_minimised_where_it_was_not_the_elbo(vae5_metrics, facts, text):
    lines = summary_lines({**vae5_metrics, **facts})
    assert any(text in line for line in lines[:2])


def test_evaluate_given_fits_result_says_what_the_run_minimised_as_the_command_line_does(vae5):
    from infer import fit

    model, guide, data = vae5
    result = fit(model, guide, data, steps=3, log_every=1, seed=0, beta=0.5)
    metrics, _ = evaluate(model, guide, data, samples=512, replicates=4, exact=False, result=result)
    assert (metrics["model"], metrics["beta"], metrics["steps"]) == ("vae", 0.5, 3)
    assert any("trained on KL weight beta=0.5" in line for line in summary_lines(metrics)[:2])
    with pytest.raises(ValueError, match=r"^result=5 is not allowed: result must be what fit\(\) returned"):
        evaluate(model, guide, data, samples=512, replicates=4, exact=False, result=5)


def test_a_plain_elbo_run_has_no_line_on_what_it_minimised(vae5_metrics):
    assert not any("trained on" in line for line in summary_lines(vae5_metrics))


def test_a_withheld_error_bar_is_said_beside_the_number(vae5_metrics):
    mc = {**vae5_metrics["montecarlo"], "loss_se": None, "loss_note": "heavy tail: Pareto k-hat 0.83"}
    m = {k: v for k, v in vae5_metrics.items() if k not in ("exact", "surgery")}
    line = next(s for s in summary_lines({**m, "montecarlo": mc}) if s.strip().startswith("loss"))
    assert "±" not in line and "heavy tail: Pareto k-hat 0.83" in line


def test_write_run_records_what_it_knows_of_the_run(vae5, tmp_path):
    from infer import fit

    model, guide, data = vae5
    result = fit(model, guide, data, steps=3, log_every=1, seed=0)
    metrics, grids = evaluate(model, guide, data, samples=512, replicates=4)
    write_run(tmp_path, model, guide, data, result, metrics, grids, figures=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert (saved["model"], saved["guide"], saved["n"], saved["steps"]) == ("vae", "gaussian", 5, 3)  # as run.py names them
    assert saved["wall_seconds"] > 0 and saved["engine"] == result.engine == "fast"
    assert "?" not in summary_lines(saved)[0]
    assert saved["machine"]["torch_kernels"] == torch.backends.cpu.get_cpu_capability()  # as run.py records it


def test_a_python_run_records_the_network_settings_its_command_line_option_does_not_set():
    from analysis.describe import describe
    from guides import GaussianGuide
    from models import VAE

    model = VAE(5, hidden=16)
    head = describe(model, GaussianGuide(model, layers=3), OneBit(5), result=None)
    assert head["arguments"] == {"model.hidden": 16, "guide.layers": 3}
    assert "arguments" not in describe(VAE(5), GaussianGuide(VAE(5)), OneBit(5), result=None)


def training_keys(head: dict) -> dict:
    """The training settings among a described run's `arguments` (not its networks' model.* and guide.*)."""
    return {k: v for k, v in head.get("arguments", {}).items() if not k.startswith(("model.", "guide."))}


def test_a_python_run_records_the_training_settings_fit_took_under_the_command_lines_keys(vae5):
    from analysis.describe import describe
    from infer import IWAE, fit

    model, guide, data = vae5
    result = fit(model, guide, data, steps=3, log_every=1, lr=1e-2, lr_final=1e-4, beta=0.5, seed=0)
    assert training_keys(describe(model, guide, data, result)) == {
        "train.steps": 3, "train.log_every": 1, "optim.lr": 0.01, "optim.lr_final": 0.0001, "train.beta": 0.5}
    iwae = fit(model, guide, data, elbo=IWAE(num_particles=8), steps=3, log_every=1, seed=0)
    assert training_keys(describe(model, guide, data, iwae)) == {
        "train.steps": 3, "train.log_every": 1, "objective": "iwae", "objective.K": 8}


def test_a_python_run_with_the_command_lines_training_settings_records_none(vae5):
    from analysis.describe import describe
    from infer import fit
    from infer.recipe import recipe

    model, guide, data = vae5
    result = fit(model, guide, data, steps=3, log_every=1, seed=0)
    result.recipe = {**result.recipe, "steps": recipe(model).steps, "log_every": 100}  # the vae's defaults
    assert training_keys(describe(model, guide, data, result)) == {}


def test_write_run_judges_divergence_as_the_command_line_does(vae5, vae5_metrics, tmp_path):
    from infer import fit

    model, guide, data = vae5
    result = fit(model, guide, data, steps=3, log_every=1, seed=0)
    metrics = vae5_metrics
    worse = {**metrics, "loss": 10 * data.n * math.log(2)}  # far above the loss of a decoder that ignores z
    with pytest.warns(RuntimeWarning, match="the run is written as diverged: training diverged: the final objective"):
        write_run(tmp_path / "bad", model, guide, data, result, worse, figures=False, checkpoint=False)
    status = json.loads((tmp_path / "bad" / "status.json").read_text())
    saved = json.loads((tmp_path / "bad" / "metrics.json").read_text())
    assert status["status"] == "diverged" and status["reason"].endswith("ignores z; lower lr")
    assert saved["loss"] is None and saved["loss_judged_diverged"] == worse["loss"]
    write_run(tmp_path / "good", model, guide, data, result, metrics, figures=False, checkpoint=False)
    assert json.loads((tmp_path / "good" / "status.json").read_text())["status"] == "ok"


def test_write_run_records_what_a_python_run_minimised_as_the_command_line_does(vae5, tmp_path):
    from infer import fit
    from infer.objectives import IWAE

    model, guide, data = vae5
    metrics, _ = evaluate(model, guide, data, samples=512, replicates=4, exact=False)
    for name, options, facts in [("beta", {"beta": 0.5, "warmup": 100}, {"objective": "closed_form", "beta": 0.5,
                                                                          "kl_weight_final": pytest.approx(0.005),
                                                                          "warmup": 100}),
                                 ("iwae", {"elbo": IWAE(num_particles=4)}, {"objective": "iwae", "iwae_K": 4})]:
        result = fit(model, guide, data, steps=2, log_every=1, seed=0, **options)
        write_run(tmp_path / name, model, guide, data, result, metrics, figures=False, checkpoint=False)
        saved = json.loads((tmp_path / name / "metrics.json").read_text())
        assert {k: saved.get(k) for k in facts} == facts


def test_the_figure_shows_the_runs_khat(vae5, vae5_metrics):
    from analysis.encodings import encodings
    from analysis.figures import site_densities

    idata = encodings(*vae5, samples=100, khat=vae5_metrics["psis"])
    assert site_densities(idata, "z")["khat"] == vae5_metrics["khat"]


@pytest.mark.slow
def test_the_default_vae_at_n1000_headline_is_exact_and_its_check_agrees():
    from infer import fit
    from infer.elbo import ClosedFormELBO

    data = OneBit(1000)
    pyro.set_rng_seed(0)
    model = VAE(data.n)
    guide = GaussianGuide(model)
    fit(model, guide, data, elbo=ClosedFormELBO(num_particles=32, noise="lattice"), steps=8000,
        adam_betas=(0.9, 0.99), seed=0)
    m, _ = evaluate(model, guide, data)
    assert m["loss_estimator"] == "exact" and math.isfinite(m["loss"])
    assert within_error_or_flagged(m["montecarlo"], m["exact"])


def test_importance_sampled_numbers_are_compared_with_the_exact_nll_when_it_exists(vae5_metrics):
    iw = {"K": 1000, "loss": 0.7248, "loss_se": 0.003, "nll": 0.7409, "nll_se": None,
          "nll_note": "heavy tail: PSIS k-hat 0.52", "note": "no quadrature"}
    m = {k: v for k, v in vae5_metrics.items() if k not in ("exact", "surgery")}
    lines = summary_lines({**m, "iwae": iw, "exact_nll": {"nll": 0.7322}})
    bound = next(s for s in lines if "IWAE-1000" in s)
    nll = next(s for s in lines if "NLL" in s and "importance" in s and "IWAE" not in s)
    assert "0.0074 below the exact NLL, a bound's sampling error (2.5 SE)" in bound
    assert "no error bar: heavy tail" in nll and "0.0087 above the exact NLL" in nll
    assert "a log-mean of K weights has finite variance whatever the weights' k-hat" in bound  # why its ± holds


def test_an_importance_sampled_bound_far_below_the_exact_nll_is_not_called_sampling_error(vae5_metrics):
    iw = {"K": 1000, "loss": 0.70, "loss_se": 0.003, "nll": 0.71, "nll_se": 0.002, "note": "no quadrature"}
    m = {k: v for k, v in vae5_metrics.items() if k not in ("exact", "surgery")}
    bound = next(s for s in summary_lines({**m, "iwae": iw, "exact_nll": {"nll": 0.7322}}) if "IWAE-1000" in s)
    assert "0.0322 below the exact NLL, 10.7 SE: too far for a bound's sampling error" in bound


@pytest.mark.parametrize("nll, far", [(0.7830, True), (0.7325, False)], ids=["77 SE above", "within its error"])
def test_an_importance_sampled_nll_far_above_the_exact_one_with_light_tailed_weights_is_flagged(vae5_metrics, nll,
                                                                                                 far):
    # a guide whose log_prob was off by 0.05 read 'posterior mass the guide's draws rarely reach' at k-hat -1.8
    iw = {"K": 1000, "loss": 0.74, "loss_se": 0.003, "nll": nll, "nll_se": 0.00066, "note": "no quadrature"}
    m = {k: v for k, v in vae5_metrics.items() if k not in ("exact", "surgery")}
    line = next(s for s in summary_lines({**m, "iwae": iw, "exact_nll": {"nll": 0.7322}})
                if "NLL" in s and "importance" in s and "IWAE" not in s)
    assert ("too far for sampling error (check that the guide's log-density" in line) == far


def test_a_guide_whose_log_prob_is_no_density_gets_no_loss_error_bar_and_a_note(vae5):
    from analysis.report import evaluate

    model, _, data = vae5

    class Offset(dist.Normal):  # its log_prob is 0.05 above a Normal's: a density that integrates to e^0.05
        def log_prob(self, value):
            return super().log_prob(value) + 0.05

    def shifted(x):
        with pyro.plate("data", 2):
            pyro.sample("z", Offset(torch.tensor([[-1.0], [1.0]]), torch.ones(2, 1)).to_event(1))

    metrics, _ = evaluate(model, shifted, data, samples=2048, replicates=4)
    assert metrics["exact_skipped"].startswith("q(z|x_k) integrates to [1.0513, 1.0513]")
    assert metrics["loss_se"] is None and "does not integrate to 1" in metrics["loss_note"]


def test_a_monte_carlo_loss_that_misses_the_exact_one_by_many_errors_is_flagged(vae5_metrics):
    m = vae5_metrics
    check = next(s for s in summary_lines(m) if "check of the exact loss" in s)
    assert "disagree" not in check  # a sound guide: within its errors
    mc = {**m["montecarlo"], "loss": m["exact"]["loss"] + 0.5, "loss_se": 0.001}
    check = next(s for s in summary_lines({**m, "montecarlo": mc}) if "check of the exact loss" in s)
    assert "SE: the two estimates disagree beyond their errors" in check


@pytest.mark.slow
def test_evaluation_at_n_one_million_stays_within_2_gb():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch, pyro; torch.set_num_threads(1)\n"
        "from models import VAE, OneBit; from guides import GaussianGuide\n"
        "from analysis.montecarlo import monte_carlo; from analysis.psis import log_weights\n"
        "from analysis.encodings import encodings\n"
        "data = OneBit(10**6); model = VAE(data.n, hidden=32); guide = GaussianGuide(model, hidden=32)\n"
        "monte_carlo(model, guide, data, samples=128, replicates=4); log_weights(model, guide, data, 128)\n"
        "encodings(model, guide, data, samples=64)\n"
        "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')) / 2**20)\n")
    # VmHWM: this process's peak resident size since its exec; getrusage's ru_maxrss keeps the forking pytest
    # worker's peak across the exec (Linux), so it read 2.7 GB after the worker had run the 2-D quadrature tests
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 2.0  # GB of peak RSS


def test_a_quadrature_that_returns_nan_is_no_headline_monte_carlo_and_iwae_stand_in(monkeypatch):
    """A trained dlgm (n = 1000, seed 2 of the study) once made exact() return a NaN KL for one data point: the
    headline must then be the Monte Carlo estimate, labelled, with the reason kept, never a NaN labelled exact."""
    import math

    import analysis.exact as exact_module
    from analysis.report import evaluate
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    data = OneBit(5)
    model = VAE(5, hidden=8)
    guide = GaussianGuide(model, hidden=8)
    fit(model, guide, data, steps=30, seed=0)
    real = exact_module.exact

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "loss": math.nan, "kl": {site: math.nan for site in out["kl"]}}

    monkeypatch.setattr(exact_module, "exact", broken)
    metrics, _ = evaluate(model, guide, data, samples=2048, replicates=4, iwae_k=64)
    assert metrics["loss_estimator"] != "exact" and math.isfinite(metrics["loss"])
    assert "exact" not in metrics and "non-finite loss, kl[z]" in metrics["exact_skipped"]
    assert math.isfinite(metrics["exact_nll"]) and "iwae" in metrics


def test_a_two_dimensional_latent_site_is_evaluated_by_quadrature_with_its_surgery_and_marginals():
    """VAE(latent_dim=2) has 2 scalar latents in one site: the quadrature integrates both coordinates, so the
    headline is exact (before, importance-sampled bounds stood in), with ELBO surgery and each coordinate's exact
    marginals for the figure."""
    from infer import fit

    data = OneBit(3)
    model = VAE(3, latent_dim=2, hidden=8)
    guide = GaussianGuide(model, hidden=8)
    fit(model, guide, data, steps=30, seed=0)
    metrics, grids = evaluate(model, guide, data, samples=1024, replicates=4, iwae_k=16)
    assert metrics["loss_estimator"] == "exact" and metrics["loss"] == metrics["exact"]["loss"]
    assert "exact_skipped" not in metrics and "iwae" not in metrics
    assert "surgery_skipped" not in metrics and metrics["surgery"]["avg_kl"] == pytest.approx(metrics["kl"]["z"])
    assert set(grids) == {"z[0]", "z[1]"}


def test_a_surgery_that_cannot_integrate_q_is_skipped_with_its_reason_and_the_rest_is_reported(vae5, monkeypatch):
    import analysis.exact as exact_module

    model, guide, data = vae5

    def refused(*args, **kwargs):
        raise ValueError("q(z|x_k) integrates to [0.6364, 0.6359] on the surgery's grid of z, not 1: no ELBO surgery")

    monkeypatch.setattr(exact_module, "surgery", refused)
    metrics, _ = evaluate(model, guide, data, samples=2048, replicates=4)
    assert "surgery" not in metrics and "no ELBO surgery" in metrics["surgery_skipped"]
    assert metrics["loss_estimator"] == "exact"
    assert any("surgery    skipped: q(z|x_k) integrates" in line for line in summary_lines(metrics))


def test_an_exact_value_the_quadrature_resolves_is_printed_with_its_digits_and_one_within_its_error_as_zero():
    exact_block = {"loss": 0.69315, "nll": 0.693141, "gap": 9.45e-6, "recon": 0.6931, "recon_per_dim": 0.6931,
                   "kl": {"z2": 5.75e-4, "z1": -2.0e-8}, "error": 7.7e-8, "estimator": "exact quadrature"}
    lines = summary_lines({"exact": exact_block, "loss_estimator": "exact"})
    assert "ELBO gap 9.45e-06 [exact]" in lines[1]  # 4 decimals printed it as 0.0000
    assert "rate[z2] 5.75e-04 + rate[z1] 0.0000 [exact]" in lines[2]  # -2e-8 is within the 7.7e-8 error of 0


def test_the_monte_carlo_line_names_the_sites_in_the_exact_lines_order():
    exact_block = {"loss": 0.7156, "nll": 0.7008, "gap": 0.0148, "recon": 0.0018, "recon_per_dim": 1.8e-6,
                   "kl": {"z2": 2.4373, "z1": -1.7236}, "error": 5e-8, "estimator": "exact quadrature"}
    mc = {"kind": "RQMC lattice", "loss": 0.7147, "loss_se": 0.0034, "recon": 0.0018, "recon_per_dim": 1.8e-6,
          "kl": {"z1": -1.7244, "z2": 2.4373}, "estimator": "randomised quasi-Monte Carlo, lattice rule"}
    lines = summary_lines({"exact": exact_block, "montecarlo": mc, "loss_estimator": "exact"})
    assert "rate[z2] 2.4373 + rate[z1] -1.7244 [RQMC lattice]" in lines[4]


def test_a_small_term_reads_alike_on_the_exact_and_the_monte_carlo_line():
    exact_block = {"loss": 0.7156, "nll": 0.7008, "gap": 0.0148, "recon": 0.0018, "recon_per_dim": 1.8e-6,
                   "kl": {"z2": 7.36e-4, "z1": 0.7127}, "error": 5e-8, "estimator": "exact quadrature"}
    mc = {"kind": "RQMC lattice", "loss": 0.7147, "loss_se": 0.0034, "recon": 0.0018, "recon_per_dim": 1.8e-6,
          "kl": {"z2": 7.41e-4, "z1": 0.7121}, "estimator": "randomised quasi-Monte Carlo, lattice rule"}
    lines = summary_lines({"exact": exact_block, "montecarlo": mc, "loss_estimator": "exact"})
    assert "rate[z2] 7.36e-04 + rate[z1] 0.7127 [exact]" in lines[2]
    assert "rate[z2] 7.41e-04 + rate[z1] 0.7121 [RQMC lattice]" in lines[4]


def test_a_total_correlation_of_rounding_size_prints_as_zero_without_a_sign():
    exact_block = {"loss": 0.7156, "nll": 0.7008, "gap": 0.0148, "recon": 0.0018, "recon_per_dim": 1.8e-6,
                   "kl": {"_AutoIAFNormal_latent": 0.7}, "error": 5e-8, "estimator": "exact quadrature",
                   "total_correlation_per_point": -3e-16}
    line = next(s for s in summary_lines({"exact": exact_block, "loss_estimator": "exact"}) if "total correlation" in s)
    assert line.endswith("the total correlation of q(z_0, z_1) / 2 0.0000 [exact]")


def test_unequal_data_weights_are_recorded_and_named_in_the_summary_with_their_floor():
    from infer import fit

    data = OneBit(3, weights=(0.3, 0.7))
    model = VAE(3, hidden=8, layers=1)
    guide = GaussianGuide(model, hidden=8, layers=1)
    fit(model, guide, data, steps=2, log_every=1, seed=0)
    metrics, _ = evaluate(model, guide, data, samples=512, replicates=4, exact=False)
    assert metrics["weights"] == [0.3, 0.7] and metrics["entropy_floor"] == pytest.approx(data.entropy)
    assert "weights=[0.3, 0.7]" in summary_lines(metrics)[0] and "floor H(w) = 0.6109" in summary_lines(metrics)[0]


def test_equal_data_weights_are_the_default_and_not_recorded(vae5_metrics):
    assert "weights" not in vae5_metrics and "weighted" not in summary_lines(vae5_metrics)[0]


def test_an_iwae_trained_run_reports_its_trained_bound_between_the_nll_and_the_elbo(vae5):
    model, guide, data = vae5
    metrics, _ = evaluate(model, guide, data, samples=4096, replicates=4, trained_K=8)
    t = metrics["trained_objective"]
    assert t["name"] == "IWAE-8" and t["repeats"] == 512
    assert metrics["exact"]["nll"] - 4 * t["se"] <= t["loss"] <= metrics["exact"]["loss"] + 4 * t["se"]
    assert any(line.strip().startswith("IWAE-8 loss (the objective it trained on)") and "[importance sampling]" in line
               for line in summary_lines(metrics))


def test_trained_k_is_refused_in_one_line_unless_a_positive_integer(vae5):
    model, guide, data = vae5
    with pytest.raises(ValueError, match="trained_K"):
        evaluate(model, guide, data, samples=512, replicates=4, trained_K=0)


# --- one rule for the importance-sampled NLL's error bar -------------------------------------------------------

def khat_record(khat, sd, ess_fraction=0.3):
    return {"khat": khat, "sd": sd, "ess_fraction": ess_fraction, "threshold": 0.73}


def test_an_nll_error_bar_that_a_further_khat_of_its_weights_does_not_allow_is_withheld_naming_it():
    from analysis.iwae import withhold_nll_se

    out = {"nll_se": 0.0014, "log_px_se": [0.001, 0.001]}
    withhold_nll_se(out, [khat_record(0.3, 0.05), khat_record(0.49, 0.05)], "the run's k-hat, 65536 draws")
    assert out["nll_se"] is None and out["log_px_se"] is None
    assert "PSIS k-hat 0.49 ± 0.05 (asymptotic sd) of the importance weights (the run's k-hat, 65536 draws;" in \
        out["nll_note"]


def test_an_nll_error_bar_that_every_khat_allows_is_kept():
    from analysis.iwae import withhold_nll_se

    out = {"nll_se": 0.0014, "log_px_se": [0.001, 0.001]}
    withhold_nll_se(out, [khat_record(0.3, 0.05), khat_record(0.6, 0.05, ess_fraction=0.995)], "the run's k-hat")
    assert out == {"nll_se": 0.0014, "log_px_se": [0.001, 0.001]}


def test_a_run_prints_no_nll_error_bar_beside_a_khat_that_does_not_allow_one():
    """The probe's run (vae latent_dim=3, n=5, 300 steps, seed 1): the NLL's block-mean k-hat, 0.45 ± 0.02, allowed
    a ±; the run's own k-hat of 65536 draws, 0.49 ± 0.05, printed beside it, does not."""
    from infer.fit import fit

    pyro.set_rng_seed(1)
    data = OneBit(5)
    model = VAE(5, latent_dim=3)
    guide = GaussianGuide(model)
    fit(model, guide, data, steps=300, seed=1)
    m, _ = evaluate(model, guide, data, seed=1)
    p = m["psis"]
    fails = [k + 2 * s >= 0.5 and e < 0.99 for k, s, e in zip(p["khat"], p["sd"], p["ess_fraction"])]
    assert any(fails), "the case no longer has a k-hat that forbids the ± (pick another)"
    assert m["iwae"]["nll_se"] is None and "the run's k-hat" in m["iwae"]["nll_note"]
    assert any("NLL" in line and "no error bar: heavy tail" in line for line in summary_lines(m))


# --- the bound an objective=iwae run trained on, at its KL weight ----------------------------------------------

def test_an_iwae_run_trained_at_a_kl_weight_reports_the_bound_of_its_kl_weighted_weights(vae5):
    """The bound evaluated is the one objectives.IWAE trains under LatentScale(beta): its loss, averaged over many
    calls, agrees with the trained bound within their errors, and differs from the bound at KL weight 1."""
    from infer.objectives import IWAE
    from infer.weights import LatentScale, weighted

    model, guide, data = vae5
    metrics, _ = evaluate(model, guide, data, samples=16384, replicates=4, trained_K=8, trained_beta=0.25)
    t = metrics["trained_objective"]
    assert t["name"] == "IWAE-8, KL weight 0.25" and t["beta"] == 0.25
    torch.manual_seed(0)
    objective = IWAE(num_particles=8)
    m, g = weighted(LatentScale(0.25)(model), data), weighted(LatentScale(0.25)(guide), data)
    losses = torch.tensor([objective.loss(m, g, data.x) for _ in range(1600)], dtype=torch.float64)
    trained, se = float(losses.mean()), float(losses.std()) / 40
    assert abs(t["loss"] - trained) < 4 * math.hypot(se, t["se"])
    at_one, _ = evaluate(model, guide, data, samples=16384, replicates=4, trained_K=8)
    assert abs(at_one["trained_objective"]["loss"] - trained) > 8 * math.hypot(se, t["se"])


def test_the_command_line_evaluates_an_iwae_runs_bound_at_the_kl_weight_of_its_last_step(vae5, monkeypatch):
    import analysis.report as report
    from omegaconf import OmegaConf

    asked = {}
    monkeypatch.setattr(report, "evaluate", lambda *a, **k: asked.update(k) or ({}, None))
    cfg = OmegaConf.create({"model": {"name": "vae"}, "guide": {"name": "gaussian"}, "seed": 0,
                            "objective": {"name": "iwae", "K": 16},
                            "train": {"beta": 0.5, "warmup": 0, "warmup_start": 0.0, "steps": 300},
                            "eval": {"samples": 1024, "replicates": 4, "noise": "lattice", "tol": 1e-4,
                                     "iwae_k": 1000}})
    result = type("R", (), {"steps": 300, "wall_seconds": 1.0})()
    report.evaluate_run(*vae5, cfg, result)
    assert asked["trained_K"] == 16 and asked["trained_beta"] == 0.5
    cfg.train.warmup = 600  # a warm-up longer than the run: the KL weight of its last step
    report.evaluate_run(*vae5, cfg, result)
    assert asked["trained_beta"] == pytest.approx(0.5 * 299 / 600)


def test_a_trained_bound_at_another_kl_weight_than_the_runs_is_not_called_the_objective_it_trained_on(vae5_metrics):
    t = {"name": "IWAE-16", "loss": 0.9796, "se": 0.0033}  # an older metrics.json: evaluated at KL weight 1
    lines = summary_lines({**vae5_metrics, "objective": "iwae", "iwae_K": 16, "beta": 0.5, "trained_objective": t})
    line = next(s for s in lines if s.strip().startswith("IWAE-16 loss"))
    assert "the objective it trained on)" not in line
    assert line.endswith("at KL weight 1: not the objective it trained on, whose KL weight was 0.5")


def test_a_trained_bound_at_the_runs_kl_weight_is_called_the_objective_it_trained_on(vae5_metrics):
    t = {"name": "IWAE-16, KL weight 0.5", "loss": 0.9796, "se": 0.0033, "beta": 0.5}
    lines = summary_lines({**vae5_metrics, "objective": "iwae", "iwae_K": 16, "beta": 0.5, "trained_objective": t})
    assert any(s.strip().startswith("IWAE-16, KL weight 0.5 loss (the objective it trained on) 0.9796")
               for s in lines)


def test_the_khat_lines_plus_minus_is_said_to_be_the_asymptotic_sd_it_is(vae5_metrics):
    from analysis.psis import khat_sd

    lines = summary_lines(vae5_metrics)
    i = next(k for k, s in enumerate(lines) if s.strip().startswith("PSIS k-hat"))
    assert "± is k-hat's asymptotic sd (1 + k) / sqrt(M), M its tail's draws: a formula, not a measured spread" \
        in lines[i + 1]
    p = vae5_metrics["psis"]
    assert p["sd"][0] == khat_sd(p["khat"][0], p["samples"])

def test_evaluate_takes_the_trained_iwae_bound_from_fits_result(vae5):
    from infer import IWAE, fit

    model, guide, data = vae5
    result = fit(model, guide, data, elbo=IWAE(num_particles=8), steps=2, log_every=1, seed=0)
    from_result, _ = evaluate(model, guide, data, samples=512, replicates=4, exact=False, result=result)
    given, _ = evaluate(model, guide, data, samples=512, replicates=4, exact=False, trained_K=8)
    assert from_result["iwae_K"] == 8 and from_result["trained_objective"] == given["trained_objective"]


def test_evaluate_takes_no_trained_bound_from_a_result_that_trained_on_the_elbo(vae5):
    from infer import fit

    model, guide, data = vae5
    result = fit(model, guide, data, steps=2, log_every=1, seed=0)
    metrics, _ = evaluate(model, guide, data, samples=512, replicates=4, exact=False, result=result)
    assert "trained_objective" not in metrics


def test_a_trained_k_that_contradicts_fits_result_is_refused_in_one_line(vae5):
    from infer import IWAE, fit

    model, guide, data = vae5
    result = fit(model, guide, data, elbo=IWAE(num_particles=8), steps=2, log_every=1, seed=0)
    with pytest.raises(ValueError, match=r"^trained_K=4 is not allowed with this result: it trained on the IWAE-8 "
                                         r"bound; leave trained_K out \(it is taken from result\) or pass 8$"):
        evaluate(model, guide, data, samples=512, replicates=4, exact=False, result=result, trained_K=4)
