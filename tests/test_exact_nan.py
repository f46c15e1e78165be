"""exact() on a DLGM whose structured guide makes q(z2|z1) a needle that leaves the located z2 range far out in z1.

A trained dlgm (n = 1000, seed 2 of the study) made exact() return a NaN KL for one data point: at z1 nodes far out
in the tail of q(z1|x) (q about e^-420 there, negligible but not zero in float64), the guide's conditional
q(z2|z1) is a needle (scale 1e-3) centred beyond the z2 range the inner quadrature locates features on. The inner
integral's first panels missed it, so the row's log-shift was set far below the needle's height; the later panel
splits found the needle more than 709 nats above that shift, exp overflowed, and inf / inf gave a NaN conditional
mean. Now the features extrapolate a peak beyond the range, and a split that finds one anyway raises the shift.
Here the same situation is built by hand: every network is affine in its input (one hidden ELU unit kept in
its linear range), so the loss terms are Gaussian expectations in closed form and log p(x_k) a 1-D integral, the
reference below (float64, no code shared with analysis.exact).
"""
import math

import numpy as np
import pytest
import torch

from analysis.densities import Densities
from analysis.exact import exact
from analysis.inner import Inner
from guides import StructuredGuide
from models import DLGM, OneBit

torch.set_num_threads(1)
N = 5
ALPHA, SIGMA = 5.0, 3.0  # p(z1|z2) = N(ALPHA z2, SIGMA^2): the prior of z1 is wide (sd 5.8), so the z1 range is too
SLOPE, NEEDLE = 0.3, 1e-3  # q(z2|z1) = N(SLOPE z1, NEEDLE^2): beyond the z2 range for |z1| above about 28
LOCS, SCALE = (-1.0, 1.0), 2.0  # q(z1|x_k) = N(LOCS[k], SCALE^2): wide, so q is not zero far out in z1
GAIN = 1.0  # p(x|z1): every bit Bernoulli(logits GAIN z1)
OFFSET = 100.0  # the hidden ELU unit's input offset: linear for inputs above -OFFSET
TOL = 1e-5  # |exact - reference|: the float32 networks' rounding (about 1e-6 here) and exact()'s own error


def softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


def make_affine(net, slope, intercept):
    """Set an mlp (1 -> one hidden ELU unit -> out) to out = slope * h + intercept, exactly affine for h > -OFFSET."""
    first, last = net[0], net[2]
    with torch.no_grad():
        first.weight.fill_(1.0)
        first.bias.fill_(OFFSET)
        last.weight.copy_(torch.tensor(slope, dtype=torch.float32)[:, None])
        last.bias.copy_(torch.tensor(intercept, dtype=torch.float32) - last.weight[:, 0] * OFFSET)


@pytest.fixture(scope="module")
def needle_dlgm():
    data = OneBit(N)
    model = DLGM(N, hidden=1, layers=1, prior_hidden=1, prior_layers=1, prior_gain=False, prior_gain_floor=None)
    guide = StructuredGuide(model, hidden=1, layers=1, upper_hidden=1, upper_layers=1)
    min_scale = 1e-5  # the nets' scale is softplus(raw) + min_scale
    make_affine(model.priors[0].body, [ALPHA, 0.0], [0.0, softplus_inverse(SIGMA - min_scale)])
    make_affine(model.decoder, [GAIN] * N, [0.0] * N)
    make_affine(guide.upper[0].body, [SLOPE, 0.0], [0.0, softplus_inverse(NEEDLE - min_scale)])
    encoder = guide.encoder.body  # input: the bits of x_k; their mean is 0 for x_0 and 1 for x_1
    with torch.no_grad():
        encoder[0].weight.fill_(1.0 / N)
        encoder[0].bias.fill_(OFFSET)
        step = LOCS[1] - LOCS[0]
        encoder[2].weight.copy_(torch.tensor([[step], [0.0]]))
        encoder[2].bias.copy_(torch.tensor([LOCS[0] - step * OFFSET, softplus_inverse(SCALE - min_scale)]))
    return model, guide, data


def reference() -> dict:
    """Per data point: loss, recon, kl {z1, z2} in closed form (recon by Gauss-Hermite 200) and log p(x_k) by
    composite Gauss-Legendre over z1 with p(z1) = N(0, ALPHA^2 + SIGMA^2), all float64."""
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    weights = weights / weights.sum()
    t, tw = np.polynomial.legendre.leggauss(100)
    edges = np.linspace(-100.0, 100.0, 201)
    z = ((edges[1:] + edges[:-1])[:, None] / 2 + (edges[1:] - edges[:-1])[:, None] / 2 * t).ravel()
    zw = ((edges[1:] - edges[:-1])[:, None] / 2 * tw).ravel()
    prior_var = ALPHA ** 2 + SIGMA ** 2
    out = {"loss": [], "recon": [], "z1": [], "z2": [], "log_px": []}
    for k, m in enumerate(LOCS):
        sign = 1.0 if k == 0 else -1.0  # log p(x_k|z1) = -N softplus(sign GAIN z1)
        recon = float(np.sum(weights * N * np.logaddexp(0.0, sign * GAIN * (m + SCALE * nodes))))
        # z2 = SLOPE z1 + NEEDLE eps; z1 - ALPHA z2 = (1 - ALPHA SLOPE) z1 - ALPHA NEEDLE eps
        e_z2_sq = (SLOPE * m) ** 2 + (SLOPE * SCALE) ** 2 + NEEDLE ** 2
        resid_mean, resid_var = (1 - ALPHA * SLOPE) * m, ((1 - ALPHA * SLOPE) * SCALE) ** 2 + (ALPHA * NEEDLE) ** 2
        kl_z1 = -0.5 * math.log(2 * math.pi * math.e * SCALE ** 2) - (
            -half_log_2pi - math.log(SIGMA) - (resid_mean ** 2 + resid_var) / (2 * SIGMA ** 2))
        kl_z2 = -0.5 * math.log(2 * math.pi * math.e * NEEDLE ** 2) - (-half_log_2pi - 0.5 * e_z2_sq)
        f = -0.5 * z ** 2 / prior_var - 0.5 * math.log(2 * math.pi * prior_var) - N * np.logaddexp(0.0, sign * GAIN * z)
        log_px = float(f.max() + math.log(np.sum(zw * np.exp(f - f.max()))))
        for key, value in (("loss", recon + kl_z1 + kl_z2), ("recon", recon), ("z1", kl_z1), ("z2", kl_z2),
                           ("log_px", log_px)):
            out[key].append(value)
    return out


def test_the_networks_are_the_affine_maps_the_reference_assumes(needle_dlgm):
    model, guide, data = needle_dlgm
    z = torch.tensor([[-60.0], [-30.0], [0.0], [45.0]])
    with torch.no_grad():
        loc, scale = guide.upper[0](z)
        assert torch.allclose(loc, SLOPE * z, atol=1e-4) and torch.allclose(scale, torch.full_like(z, NEEDLE))
        loc, scale = model.priors[0](z)
        assert torch.allclose(loc, ALPHA * z, atol=1e-3) and torch.allclose(scale, torch.full_like(z, SIGMA))
        loc, scale = guide.encoder(data.x)
        assert torch.allclose(loc[:, 0], torch.tensor(LOCS)) and torch.allclose(scale, torch.full_like(scale, SCALE))
        assert torch.allclose(model.decoder(z), GAIN * z.expand(-1, N), atol=1e-4)


def check_against_reference(result):
    numbers = [result["loss"], result["recon"], *result["kl"].values(), *result["log_px"]]
    assert all(math.isfinite(v) for v in numbers), f"exact() returned non-finite numbers: {numbers}"
    assert math.isfinite(result["error"]) and result["error"] < 1e-4
    ref = reference()
    per = result["per_point"]
    for k in range(2):
        assert per["loss"][k] == pytest.approx(ref["loss"][k], abs=TOL)
        assert per["recon"][k] == pytest.approx(ref["recon"][k], abs=TOL)
        assert per["kl"]["z1"][k] == pytest.approx(ref["z1"][k], abs=TOL)
        assert per["kl"]["z2"][k] == pytest.approx(ref["z2"][k], abs=TOL)
        assert result["log_px"][k] == pytest.approx(ref["log_px"][k], abs=TOL)
    assert result["loss"] == pytest.approx(float(np.mean(ref["loss"])), abs=TOL)


def test_a_needle_beyond_the_located_range_gives_finite_numbers_equal_to_the_closed_form(needle_dlgm):
    check_against_reference(exact(*needle_dlgm))


def test_a_needle_that_the_features_miss_and_a_split_finds_does_not_overflow(needle_dlgm, monkeypatch):
    """Without the extrapolated features the inner splits find the needle up to thousands of nats above the first
    panels' peak: the row's log-shift is raised (no exp overflow) and the numbers still equal the closed form."""
    monkeypatch.setattr(Inner, "_beyond", lambda self, e, grid: torch.full(e.shape[:-1], math.nan,
                                                                                   dtype=torch.float64))
    check_against_reference(exact(*needle_dlgm))


def test_far_out_in_z1_the_inner_integral_finds_the_needle_beyond_the_range(needle_dlgm):
    """At z1 = u with SLOPE u outside the located z2 range, the inner integral of q(z1 = u, z2|x_k) over z2 is
    q(u|x_k) (q(z2|z1) has mass 1) and the conditional mean of log q(z2|z1) is minus its entropy."""
    model, guide, data = needle_dlgm
    inner = Inner(Densities(model, guide, data), "z1", "z2", -8.0, 8.0)
    u = torch.tensor([[-44.0, -44.0], [-40.0, 35.0], [40.0, 44.0]], dtype=torch.float64)
    assert bool(((SLOPE * u).abs() > 8.0 + 1.0).all())
    result = inner(u)
    log_q = torch.distributions.Normal(torch.tensor(LOCS, dtype=torch.float64), SCALE).log_prob(u)
    assert torch.allclose(result["lq"], log_q, rtol=0, atol=1e-3)
    entropy = 0.5 * math.log(2 * math.pi * math.e * NEEDLE ** 2)
    assert torch.allclose(result["mean"]["q:z2"], torch.full_like(u, -entropy), rtol=0, atol=1e-3)
