"""The evaluation's cheap paths give the thorough paths' numbers (analysis.exact): the refinement that skips
numerically zero tail panels, and the inner integral's shortcuts (a row stops splitting when its error stalls, splits
only the panels it needs, a zoom that jumps to a parabola's peak, a short width ladder, no evaluation of padding panels
or of repeated features). Behaviour only, no timings."""
import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import analysis.inner
import analysis.quadrature
import analysis.seeding
from analysis.densities import Densities
from analysis.exact import exact, surgery
from analysis.inner import Inner
from guides import GaussianGuide
from models import VAE
from test_exact import N, data, dlgm_pair  # noqa: F401  the same trained dlgm (n = 5) as the exact tests

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fast(dlgm_pair, data):
    return exact(*dlgm_pair, data)


def numbers(result) -> list:
    return [result["loss"], result["nll"], result["recon"], *result["kl"].values(), *result["log_px"],
            *result["per_point"]["loss"]]


def nodes(result) -> int:
    return int(result["estimator"].split(" nodes per data point")[0].split()[-1])


def test_refinement_without_the_zero_tails_gives_the_numbers_of_refining_every_panel(dlgm_pair, data, fast,
                                                                                     monkeypatch):
    # no panel is negligible: every one is split and re-evaluated
    monkeypatch.setattr(analysis.quadrature, "TAIL_NEGLIGIBLE", 0.0)
    thorough = exact(*dlgm_pair, data)
    assert nodes(fast) < nodes(thorough), "the trained dlgm's range has zero tails: the cheap path must drop some"
    bound = max(fast["error"], thorough["error"])
    assert max(abs(a - b) for a, b in zip(numbers(fast), numbers(thorough))) <= bound


def test_inner_shortcuts_give_the_numbers_of_the_thorough_inner_integral(dlgm_pair, data, fast, monkeypatch):
    monkeypatch.setattr(analysis.inner, "STALL_ROUNDS", 10 ** 6)  # rows split until tolerance or the round limit
    monkeypatch.setattr(analysis.seeding, "ZOOM_SHRINK", 4.0)  # the plain zoom: shrink by 4 per step
    monkeypatch.setattr(analysis.seeding, "LADDER_STEPS", 40)  # the width ladder reaches the span from any bracket
    monkeypatch.setattr(analysis.inner, "INNER_TOL", 1e-6)  # 100 x tighter inner integrals
    thorough = exact(*dlgm_pair, data)
    bound = max(fast["error"], thorough["error"])
    assert bound <= 1e-4
    assert max(abs(a - b) for a, b in zip(numbers(fast), numbers(thorough))) <= bound


def linear_model(a: float, s: float):
    """z2 ~ N(0, 1), z1 | z2 ~ N(a z2, s^2), x ignores z1 (logits 0): p(x, z1) = N(z1; 0, a^2 + s^2) 2^-N."""

    def model(x):
        with pyro.plate("data", x.shape[-2]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(a * z2, s).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=torch.zeros(z1.shape[:-1] + x.shape[-1:])).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[-2]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(1), math.hypot(a, s)).to_event(1))
            pyro.sample("z2", dist.Normal(a * z1 / (a * a + s * s), s / math.hypot(a, s)).to_event(1))

    return model, guide


@pytest.fixture
def float64_default():
    """torch's default dtype float64 while the test runs (a model without parameters then computes in float64)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def test_the_zoom_lands_on_a_needle_and_the_inner_integral_is_exact(data, float64_default):
    """p(z1 = u|z2) p(z2) is a needle in z2 of width s / a = 3.3e-5 at z2 = a u / (a^2 + s^2): a breakpoint sits
    within one width of it, and the inner integral at every level is log N(u; 0, a^2 + s^2) - N log 2 to 1e-9
    with the model in float64. (In float32 the model's own rounding of z2 and of a z2, 1e-4 of the needle's log
    density per node, leaves 1e-5 to 7e-5 whatever the panels: that floor is the model's, not the rule's.)"""
    a, s = 300.0, 1e-2
    model, guide = linear_model(a, s)
    inner = Inner(Densities(model, guide, data), "z1", "z2", -8.0, 8.0, ("p",))
    u = torch.tensor([[-70.0, -3.0], [0.5, 25.0], [110.0, 230.0]], dtype=torch.float64)
    lo, hi = inner.features(u)
    mode, width = a * u / (a * a + s * s), s / math.hypot(a, s)
    assert bool(((lo - mode[..., None]).abs().amin(-1) < width).all())
    closed = torch.distributions.Normal(0.0, math.hypot(a, s)).log_prob(u) - N * math.log(2)
    for level in range(3):
        assert torch.allclose(inner(u, level=level)["lp"], closed, rtol=0, atol=1e-9), level


def _counting_prior_net(model):
    """A list that grows by the number of z2 values the dlgm's prior net p(z1|z2) is evaluated at, per call."""
    counts = []
    model.priors[0].register_forward_hook(lambda module, inputs, output: counts.append(inputs[0].numel()))
    return counts


def test_padding_panels_and_repeated_features_are_not_evaluated_and_change_no_number(dlgm_pair, fast, data,
                                                                                        monkeypatch):
    """The inner integrals skip the zero-width panels that pad a row to its block's panel count, and the feature
    zoom skips candidates that repeat another in every row: exact() and surgery() give the numbers of evaluating
    every node, to the bit, from fewer evaluations of the prior net."""
    model, guide = copy.deepcopy(dlgm_pair[0]), copy.deepcopy(dlgm_pair[1])
    skipping = _counting_prior_net(model)
    lean, lean_split = exact(model, guide, data), surgery(model, guide, data)
    monkeypatch.setattr(analysis.inner, "LIVE_GROUP", 10 ** 9)  # every row evaluates all of its block's panels
    original = analysis.seeding.FeatureSeeding._values
    monkeypatch.setattr(analysis.seeding.FeatureSeeding, "_values",
                        lambda self, u, points, kinds, repeat=None: original(self, u, points, kinds))
    every = _counting_prior_net(model)
    skipping_count = sum(skipping)
    full, full_split = exact(model, guide, data), surgery(model, guide, data)
    assert sum(every) - skipping_count > 0.1 * skipping_count  # the skipped nodes were a real part of the work
    for key in ("loss", "recon", "nll", "error"):
        assert lean[key] == full[key]
    assert lean["kl"] == full["kl"] and lean["log_px"] == full["log_px"]
    assert lean_split == full_split
    assert lean["loss"] == fast["loss"]


def test_one_evaluation_draws_its_quadratures_ranges_once_and_reports_the_numbers_of_separate_calls(data,
                                                                                                      monkeypatch):
    """evaluate() runs exact() and surgery() (on float64 copies of the networks) and posterior_grid() (on the
    networks as they are), each of which places its ranges from fixed-seed draws (Densities.samples): they are
    made once per dtype, and the numbers are those of the separate calls."""
    from analysis.report import evaluate

    pyro.set_rng_seed(0)
    model = VAE(N)
    guide = GaussianGuide(model)
    separate = exact(model, guide, data), surgery(model, guide, data)
    made = []
    original = Densities._samples
    monkeypatch.setattr(Densities, "_samples", lambda self, *args: made.append(self.dtype) or original(self, *args))
    metrics, grids = evaluate(model, guide, data, samples=1024, replicates=4)
    assert sorted(map(str, made)) == ["torch.float32", "torch.float64"]
    assert {k: v for k, v in metrics["exact"].items() if k not in ("rate", "distortion")} == separate[0]
    assert metrics["surgery"] == separate[1]
    exact(model, guide, data)  # outside an evaluation nothing is kept
    assert len(made) == 3
