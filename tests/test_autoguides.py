"""Pyro autoguides get the same evaluation as our guides: exact quadrature, surgery, IWAE and k-hat.

AutoNormal factorises over the data points; AutoContinuous guides (AutoMultivariateNormal, AutoIAFNormal) are one
joint density over both points, evaluated through its marginals plus its total correlation."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal

from analysis.exact import evidence, exact, surgery
from analysis.iwae import iwae
from analysis.qdensity import GuideDensity
from analysis.report import evaluate
from guides import StructuredGuide
from models import DLGM, VAE, OneBit

torch.set_num_threads(1)
N = 5
LOC, SCALE, R = torch.tensor([-0.7, 0.9]), torch.tensor([0.5, 0.3]), 0.75


@pytest.fixture(scope="module")
def data():
    return OneBit(N)


@pytest.fixture(scope="module")
def model():
    pyro.set_rng_seed(0)
    return VAE(N, hidden=8)


def independent_guide(loc, scale):
    """q(z|x_k) = N(loc_k, scale_k^2), written by hand."""

    def guide(x):
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Normal(loc[:, None], scale[:, None]).to_event(1))

    return guide


def joint_gaussian(model, data):
    """AutoMultivariateNormal with covariance diag(s) [[1, r], [r, 1 + r^2]] diag(s) over (z_0, z_1); returns it,
    its marginal scales and the total correlation of (z_0, z_1) in nats."""
    guide = AutoMultivariateNormal(model)
    guide(data.x)
    with torch.no_grad():
        guide.loc.copy_(LOC)
    guide.scale = SCALE.clone()
    guide.scale_tril = torch.tensor([[1.0, 0.0], [R, 1.0]])  # unit lower Cholesky factor
    marginal = SCALE * torch.tensor([1.0, math.sqrt(1 + R ** 2)])
    rho2 = R ** 2 / (1 + R ** 2)
    return guide, marginal, -0.5 * math.log(1 - rho2)


def test_autonormal_is_evaluated_exactly_like_the_same_hand_written_gaussian(model, data):
    guide = AutoNormal(model)
    guide(data.x)
    with torch.no_grad():
        guide.locs.z.copy_(LOC[:, None])
    guide.scales.z = SCALE[:, None].clone()
    auto, hand = exact(model, guide, data), exact(model, independent_guide(LOC, SCALE), data)
    for key in ("loss", "recon", "nll"):
        assert auto[key] == pytest.approx(hand[key], abs=1e-5)


def test_a_joint_guide_is_read_through_its_packed_latent(model, data):
    guide, _, _ = joint_gaussian(model, data)
    density = GuideDensity(model, guide, data.x)
    z = torch.tensor([[[0.1], [-0.4]], [[1.0], [2.0]]])  # two values of (z_0, z_1)
    want = guide.get_posterior().log_prob(z.squeeze(-1))
    assert density.kind == "joint"
    assert torch.allclose(density.log_joint({"z": z}), want, atol=1e-5)


def test_a_joint_guide_pays_its_total_correlation_on_top_of_its_marginals(model, data):
    guide, marginal, tc = joint_gaussian(model, data)
    joint, apart = exact(model, guide, data), exact(model, independent_guide(LOC, marginal), data)
    assert joint["total_correlation_per_point"] == pytest.approx(tc / 2, abs=2e-5)
    assert joint["loss"] == pytest.approx(apart["loss"] + tc / 2, abs=5e-5)
    assert joint["recon"] == pytest.approx(apart["recon"], abs=5e-5)
    assert joint["nll"] == pytest.approx(apart["nll"], abs=1e-6)  # the model alone decides log p(x)


def test_surgery_of_a_joint_guide_uses_its_marginals(model, data):
    guide, marginal, _ = joint_gaussian(model, data)
    joint, apart = surgery(model, guide, data), surgery(model, independent_guide(LOC, marginal), data)
    for key in ("avg_kl", "mutual_info", "marginal_kl"):
        assert joint[key] == pytest.approx(apart[key], abs=5e-5)


def test_joint_importance_weights_count_the_guide_density_once(model, data):
    guide, _, _ = joint_gaussian(model, data)
    bound = iwae(model, guide, data, K=1, samples=20000, nll_samples=2000, seed=0)
    assert bound["joint"]
    assert abs(bound["loss"] - exact(model, guide, data)["loss"]) < 4 * bound["loss_se"] + 1e-3


def test_a_joint_guide_over_two_latent_sites_is_refused_by_quadrature_with_the_dimension(data):
    model = DLGM(N, hidden=8, prior_hidden=8)
    with pytest.raises(ValueError, match="4-D"):
        exact(model, AutoIAFNormal(model, hidden_dim=[8]), data)


@pytest.mark.parametrize("make", [AutoNormal, lambda m: AutoIAFNormal(m, hidden_dim=[8])], ids=["normal", "iaf"])
def test_an_autoguide_on_the_vae_gets_exact_numbers_surgery_and_khat(model, data, make):
    pyro.set_rng_seed(1)
    metrics, grids = evaluate(model, make(model), data, samples=2048, replicates=4)
    assert {"exact", "surgery", "khat"} <= set(metrics)
    assert metrics["loss"] == metrics["exact"]["loss"] and metrics["loss_estimator"] == "exact"
    mc = metrics["montecarlo"]
    assert mc["loss_se"] is None or abs(metrics["exact"]["loss"] - mc["loss"]) < 5 * mc["loss_se"] + 1e-3
    assert set(grids) == {"z"}


def test_a_joint_autoguide_on_the_dlgm_falls_back_to_iwae_with_the_reason(data):
    pyro.set_rng_seed(1)
    model = DLGM(N, hidden=8, prior_hidden=8)
    metrics, grids = evaluate(model, AutoIAFNormal(model, hidden_dim=[8]), data, samples=512, replicates=4,
                              iwae_k=8)
    assert "exact" not in metrics and grids is None
    assert "4-D" in metrics["exact_skipped"] and metrics["iwae"]["joint"]
    assert "joint" in metrics["khat_note"]
    assert metrics["exact_nll"]["nll"] == pytest.approx(evidence(model, StructuredGuide(model), data)["nll"], abs=1e-5)


def test_the_evidence_alone_equals_the_nll_of_full_quadrature(data):
    pyro.set_rng_seed(2)
    model = DLGM(N, hidden=8, prior_hidden=8)
    guide = StructuredGuide(model)
    full, alone = exact(model, guide, data), evidence(model, guide, data)
    assert alone["log_px"] == pytest.approx(full["log_px"], abs=1e-5)


def test_quadrature_refuses_a_point_mass_guide_instead_of_scoring_zero(model, data):
    from pyro.infer.autoguide import AutoDelta

    with pytest.raises(ValueError, match=r"point mass \(Delta\)"):
        exact(model, AutoDelta(model), data)


def test_free_bits_floor_the_model_sites_but_not_a_joint_auxiliary(data):
    from infer.elbo import ClosedFormELBO
    from infer import weighted

    pyro.set_rng_seed(0)
    model = DLGM(N, hidden=8, prior_hidden=8)
    guide = AutoIAFNormal(model, hidden_dim=[8])
    elbo = ClosedFormELBO(num_particles=4, free_bits=50.0)
    with torch.no_grad():
        terms = elbo.particle_terms(weighted(model, data), weighted(guide, data), data.x)
    aux = [k for k in terms if k not in ("recon", "kl_z1", "kl_z2")]
    assert aux == ["kl__AutoIAFNormal_latent"]
    want = terms["recon"].mean() + sum(terms[k].mean().clamp_min(50.0) for k in ("kl_z1", "kl_z2")) \
        + terms[aux[0]].mean()
    assert float(elbo.objective(terms)) == pytest.approx(float(want))


def test_khat_depends_on_the_seed_only_not_on_which_blocks_ran_before_it(model, data):
    guide = independent_guide(LOC, SCALE)
    with_exact, _ = evaluate(model, guide, data, samples=512, replicates=4, seed=3)
    without, _ = evaluate(model, guide, data, samples=512, replicates=4, seed=3, exact=False)
    assert with_exact["khat"] == without["khat"]


def test_the_quadrature_of_a_trained_autonormal_runs_in_float64(data):
    """No node is rounded to float32: the numbers are those of a float64 model and a float64 param store (AutoNormal
    reads its locs and scales from the store), to the last bit."""
    import copy

    from infer import fit

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = VAE(N, hidden=8)
    guide = AutoNormal(model, init_scale=0.1)
    fit(model, guide, data, steps=150, seed=0)
    store = pyro.get_param_store()
    state = store.get_state()
    wide = {"params": {k: v.detach().double() for k, v in state["params"].items()},
            "constraints": state["constraints"]}
    result = exact(model, guide, data)
    assert all(v.dtype == torch.float32 for v in store.get_state()["params"].values())  # the store is put back
    assert all(p.dtype == torch.float32 for p in guide.parameters())  # and the guide's own tensors
    with store.scope(wide):
        reference = exact(copy.deepcopy(model).double(), guide, data)
    assert result["loss"] == reference["loss"] and result["nll"] == reference["nll"]


def test_the_encodings_figure_labels_a_joint_guides_one_k_hat_as_joint(data):
    from analysis.encodings import encodings
    from analysis.figures import encoding_figure

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = VAE(N, hidden=8)
    guide = AutoMultivariateNormal(model)
    guide(data.x)
    idata = encodings(model, guide, data, samples=200, khat={"khat": [0.86, 0.86], "samples": 1024, "joint": True})
    fig = encoding_figure(idata)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("joint k-hat 0.86 [PSIS, both points]" in t for t in labels), labels
    assert not any(", k-hat 0.86 [PSIS]" in t for t in labels)


def test_a_joint_autoguides_site_terms_are_what_the_summary_says_they_are(data):
    """rate[z2] of a site the guide makes of its joint draw (a point mass, log q 0 on a real site) is
    -E_q[log p(z2)]: checked against draws of the guide, and the summary's note says so."""
    from analysis.montecarlo import monte_carlo
    from analysis.summary_text import summary_lines

    pyro.set_rng_seed(3)
    model = DLGM(N, hidden=8, prior_hidden=8)
    guide = AutoMultivariateNormal(model)
    torch.manual_seed(0)
    mc = monte_carlo(model, guide, data, samples=4096, replicates=4, noise="mc")
    with torch.no_grad(), pyro.plate("draws", 20000, dim=-3):
        z2 = pyro.poutine.trace(guide).get_trace(data.x).nodes["z2"]["value"]  # (draws, 2, latent_dim)
    cross = -dist.Normal(0.0, 1.0).log_prob(z2).sum(-1).mean(0)  # -E_q[log p(z2)] per data point
    assert mc["kl"]["z2"] == pytest.approx(float((data.w * cross).sum()), abs=3e-3)  # both sampling errors < 5e-4
    note = next(line for line in summary_lines(mc) if "rate[s]" in line)
    assert "rate[joint] = E_q[log q(u|x)]" in note and "transform's log-Jacobian (0 for a real site)" in note


@pytest.mark.parametrize("make, said", [
    (lambda m: AutoIAFNormal(m, hidden_dim=[32]), {"guide.num_transforms": 1}),  # Pyro's 1 flow; guide=autoiaf's 2
    (lambda m: AutoIAFNormal(m, hidden_dim=[16], num_transforms=2), {"guide.hidden_dim": [16]}),
    (lambda m: AutoIAFNormal(m, hidden_dim=[32], num_transforms=2), {}),  # conf/guide/autoiaf.yaml's settings
    (lambda m: AutoNormal(m, init_scale=0.05), {"guide.init_scale": 0.05}),
    (lambda m: AutoNormal(m), {}),
])
def test_a_python_runs_autoguide_built_otherwise_than_its_command_line_option_says_so_in_its_arguments(make, said):
    from analysis.describe import describe

    model = VAE(N)
    arguments = describe(model, make(model), OneBit(N), None).get("arguments", {})
    assert {k: v for k, v in arguments.items() if k.startswith("guide.")} == said
