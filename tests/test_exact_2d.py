"""exact() on one latent site of two scalars (the VAE at latent_dim=2): its numbers, evidence(), surgery() and
posterior_grid() against an independent float64 evaluation, and the refusals that remain.

The reference shares no code with analysis.exact: it reads float64 copies of the trained networks directly and
integrates by adaptive tensor-product Gauss-Legendre cubature on rectangles (20 x 20 nodes, a rectangle bisected
along the axis whose 10-point rule disagrees most, until both 10-point rules agree to REFERENCE_TOL): the
expectations under q in q's own noise (z = m + s eps, eps in [-12, 12]^2), the evidence in z over [-9, 9]^2 (beyond
it the prior holds below e^-40 of its mass, and p(x|z) <= 1). Its own error estimate is checked to be far below the
tolerance, so the comparison measures exact() alone.
"""
import copy
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from analysis.exact import evidence, exact, posterior_grid, surgery
from guides import FlowGuide, GaussianGuide, MeanFieldGuide
from infer.elbo import ClosedFormELBO
from infer.fit import fit
from models import DLGM, VAE, OneBit

torch.set_num_threads(1)
REFERENCE_TOL = 1e-11  # per rectangle: |GL20 x 20 - GL10 x 20| and |GL20 x 20 - GL20 x 10|, on integrands of size ~1
REFERENCE_MAX_ERROR = 1e-7  # the reference's own error estimate must be below this
MAX_ERROR = 1e-4  # the largest error exact() may report
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------- the independent reference
def _rule(m: int):
    x, w = np.polynomial.legendre.leggauss(m)
    return torch.tensor(x), torch.tensor(w)


def cubature(f, box, tol: float = REFERENCE_TOL, start: int = 8, max_rects: int = 60000):
    """Integral of f (nodes (M, 2) float64 -> values (M, C)) over box ((a1, b1), (a2, b2)): per rectangle the
    tensor-product Gauss-Legendre 20 x 20 rule and the two rules with 10 points on one axis; a rectangle whose
    10-point rules differ from the 20 x 20 one by more than tol (any column) is bisected along the axis where the
    difference is larger. Returns (integral (C,), error estimate: the sum of the final rectangles' largest
    difference)."""
    (x20, w20), (x10, w10) = _rule(20), _rule(10)
    rules = [(x20, w20, x20, w20), (x10, w10, x20, w20), (x20, w20, x10, w10)]
    e1, e2 = (torch.linspace(a, b, start + 1, dtype=torch.float64) for a, b in box)
    lo = torch.stack(torch.meshgrid(e1[:-1], e2[:-1], indexing="ij"), -1).reshape(-1, 2)
    hi = torch.stack(torch.meshgrid(e1[1:], e2[1:], indexing="ij"), -1).reshape(-1, 2)
    total, error = 0.0, 0.0
    while lo.shape[0]:
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        est = []
        for xa, wa, xb, wb in rules:
            nodes = torch.stack(torch.meshgrid(xa, xb, indexing="ij"), -1).reshape(-1, 2)  # (Q, 2)
            weights = (wa[:, None] * wb[None, :]).reshape(-1)
            z = mid[:, None] + half[:, None] * nodes  # (R, Q, 2)
            values = torch.cat([f(c) for c in z.reshape(-1, 2).split(8192)]).reshape(z.shape[0], len(weights), -1)
            est.append((half.prod(-1)[:, None] * (weights[None, :, None] * values).sum(1)))
        d1, d2 = ((est[0] - e).abs().amax(-1) for e in est[1:])
        done = torch.maximum(d1, d2) <= tol
        if lo.shape[0] > max_rects:  # give up refining: the error estimate says how far it got
            done = torch.ones_like(done)
        total = total + est[0][done].sum(0)
        error += float(torch.maximum(d1, d2)[done].sum())
        lo, hi, mid, axis = lo[~done], hi[~done], mid[~done], (d2 > d1)[~done].long()
        cut = mid.gather(1, axis[:, None]).squeeze(1)
        hi_left, lo_right = hi.clone(), lo.clone()
        hi_left[torch.arange(len(axis)), axis] = cut
        lo_right[torch.arange(len(axis)), axis] = cut
        lo, hi = torch.cat([lo, lo_right]), torch.cat([hi_left, hi])
    return total, error


def log_normal(z):
    """log N(z; 0, I) for z (..., 2)."""
    return -0.5 * (z ** 2).sum(-1) - LOG_2PI


def log_likelihoods(decoder, z):
    """log p(x0|z), log p(x1|z) for z (M, 2) float64: (M, 2), from float64 logits (-softplus(f) for a 0-bit and
    -softplus(-f) for a 1-bit: no cancellation)."""
    with torch.no_grad():
        f = decoder(z)
    return torch.stack([-F.softplus(f).sum(-1), -F.softplus(-f).sum(-1)], -1)


def one_bit(n: int) -> torch.Tensor:
    """The data x0 = 0^n, x1 = 1^n, float64 (2, n)."""
    return torch.stack([torch.zeros(n), torch.ones(n)]).double()


def gaussian_noise(guide):
    """forward(eps (M, 2), k) -> (z (M, 2), log|dz/d eps| (M,)) of a guide q(z|x_k) = N(m_k, diag s_k^2) whose (m,
    s) come from its GaussianNet (GaussianGuide.encoder, MeanFieldGuide.encoders[0]), read directly."""
    net = guide.encoder if hasattr(guide, "encoder") else guide.encoders[0]
    loc, scale = net(one_bit(guide.n))  # (2, 2) each
    return lambda eps, k: (loc[k] + scale[k] * eps, scale[k].log().sum().expand(eps.shape[0]))


def flow_noise(guide):
    """forward(eps, k) of a FlowGuide: z = T_k(eps) through the transforms of its traced distribution (elementwise
    splines, then a diagonal affine map), with the log-Jacobian summed over the two coordinates."""
    fn = poutine.trace(guide).get_trace(one_bit(guide.n)).nodes["z"]["fn"]

    def forward(eps, k):
        y, ladj = eps[:, None, :].expand(-1, 2, 2), 0.0
        for t in fn.transforms:
            y_next = t(y)
            j = t.log_abs_det_jacobian(y, y_next)
            ladj, y = ladj + (j.sum(-1) if j.dim() == 3 else j), y_next
        return y[:, k], ladj[:, k]

    return forward


@torch.no_grad()
def reference(model, guide, data, noise=gaussian_noise) -> dict:
    """Per data point recon, kl and log p(x_k) of a latent_dim=2 VAE, its guide's q(z|x_k) read in its own noise
    (noise(guide): eps -> z), the networks float64 copies; and the largest error estimate."""
    model, guide = copy.deepcopy(model).double(), copy.deepcopy(guide).double()
    forward = noise(guide)
    ll = lambda z: log_likelihoods(model.decoder, z)  # noqa: E731
    box = ((-9.0, 9.0), (-9.0, 9.0))
    g = torch.linspace(-9, 9, 301, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    shift = (ll(grid) + log_normal(grid)[:, None]).amax(0)
    mass, err = cubature(lambda z: (ll(z) + log_normal(z)[:, None] - shift).exp(), box)
    out = {"log_px": (mass.log() + shift).tolist(), "recon": [], "kl": [], "errors": [err / float(mass.min())]}
    for k in range(2):
        def integrand(eps):
            z, ladj = forward(eps, k)
            weight = log_normal(eps).exp()
            log_q = log_normal(eps) - ladj
            return weight[:, None] * torch.stack([torch.ones_like(weight), -ll(z)[:, k], log_q - log_normal(z)], -1)

        (q_mass, recon, kl), err = cubature(integrand, ((-12.0, 12.0), (-12.0, 12.0)))
        out["recon"].append(float(recon))
        out["kl"].append(float(kl))
        out["errors"].append(err)
    out["error"] = max(out["errors"])
    return out


def differences(result: dict, ref: dict, w) -> dict:
    """|exact - reference| of every number exact() reports (nats per data point)."""
    per = result["per_point"]
    loss = [ref["recon"][k] + ref["kl"][k] for k in range(2)]
    d = {"loss": abs(result["loss"] - sum(w[k] * loss[k] for k in range(2))),
         "recon": abs(result["recon"] - sum(w[k] * ref["recon"][k] for k in range(2))),
         "kl[z]": abs(result["kl"]["z"] - sum(w[k] * ref["kl"][k] for k in range(2))),
         "nll": abs(result["nll"] + sum(w[k] * ref["log_px"][k] for k in range(2)))}
    for k in range(2):
        d[f"log_px[x{k}]"] = abs(result["log_px"][k] - ref["log_px"][k])
        d[f"recon[x{k}]"] = abs(per["recon"][k] - ref["recon"][k])
        d[f"kl[x{k}]"] = abs(per["kl"]["z"][k] - ref["kl"][k])
    return d


def trained(n: int, steps: int, guide_class=GaussianGuide):
    data = OneBit(n)
    torch.manual_seed(0)
    model = VAE(n, latent_dim=2, hidden=32, gain=True)
    guide = guide_class(model, hidden=32)
    fit(model, guide, data, elbo=ClosedFormELBO(num_particles=32, noise="lattice"), steps=steps, lr=3e-3,
        lr_final=3e-5, adam_betas=(0.9, 0.99), seed=0)
    return model, guide, data


def check_against_reference(model, guide, data, noise=gaussian_noise):
    """exact() reports an error below MAX_ERROR that bounds its distance to the reference; returns the distances."""
    result = exact(model, guide, data)
    ref = reference(model, guide, data, noise)
    assert ref["error"] < REFERENCE_MAX_ERROR, f"the reference itself has not converged: {ref['error']:.1e}"
    diff = differences(result, ref, list(data.weights))
    worst = max(diff, key=diff.get)
    assert result["error"] <= MAX_ERROR, f"reported error {result['error']:.1e} > {MAX_ERROR}"
    assert diff[worst] <= result["error"] + ref["error"], (
        f"|exact - reference| of {worst} is {diff[worst]:.2e}, above the reported error {result['error']:.2e} "
        f"(+ the reference's own {ref['error']:.1e})")
    return result, diff


# ---------------------------------------------------------------- agreement with the reference
@pytest.mark.parametrize("guide_class", [GaussianGuide, MeanFieldGuide], ids=["gaussian", "meanfield"])
def test_exact_integrates_a_two_dimensional_site_to_the_reference_at_small_n(guide_class):
    model, guide, data = trained(5, 300, guide_class)
    result, diff = check_against_reference(model, guide, data)
    assert max(diff.values()) < 1e-6
    assert list(result["kl"]) == ["z"] and "2-D" in result["estimator"]


def test_exact_weighs_the_two_points_of_a_two_dimensional_site_by_the_data_weights():
    model, guide, _ = trained(5, 300)
    data = OneBit(5, weights=(0.8, 0.2))
    result, diff = check_against_reference(model, guide, data)
    assert max(diff.values()) < 1e-6


@pytest.mark.slow
def test_exact_integrates_a_two_dimensional_flow_guide_to_the_reference():
    """A flow guide of two coordinates has no scalar base noise: its density is read at z (the spline's inverse),
    and the quadrature still meets its reported error (measured 2026-12-02: 6e-6 off in recon[x0], reported
    1.1e-5; the reference's cubature over the spline's kinks takes 30 s of the 50)."""
    model, guide, data = trained(5, 300, FlowGuide)
    check_against_reference(model, guide, data, flow_noise)


@pytest.mark.slow
def test_exact_integrates_a_two_dimensional_site_to_the_reference_at_n_1000():
    """500 steps at n = 1000: q(z|x_k) is narrow (KL 3.1 nats), the hard case; measured 2026-12-02: every number
    within 5e-9 of the reference, reported error 8.9e-8."""
    model, guide, data = trained(1000, 500)
    result, diff = check_against_reference(model, guide, data)
    assert max(diff.values()) < 1e-6


def adaptive_1d(f, lo: float, hi: float, tol: float = 1e-12, panels: int = 64, rounds: int = 40):
    """Integral over [lo, hi] of f (nodes (M,) -> values (M, C)): Gauss-Legendre 20 on panels bisected until
    Gauss-Legendre 10 agrees to tol; returns (integral (C,), error estimate)."""
    rules = [_rule(20), _rule(10)]
    edges = torch.linspace(lo, hi, panels + 1, dtype=torch.float64)
    a, b, total, error = edges[:-1], edges[1:], 0.0, 0.0
    for i in range(rounds):
        mid, half = ((a + b) / 2)[:, None], ((b - a) / 2)[:, None]
        est = [(half[..., None] * w[None, :, None] * f((mid + half * x).reshape(-1)).reshape(len(a), len(x), -1)).sum(1)
               for x, w in rules]
        diff = (est[0] - est[1]).abs().amax(-1)
        done = (diff <= tol) | (i == rounds - 1)  # the last round keeps every panel: its error estimate says so
        total, error = total + est[0][done].sum(0), error + float(diff[done].sum())
        if bool(done.all()):
            break
        a, b = torch.cat([a[~done], mid[~done, 0]]), torch.cat([mid[~done, 0], b[~done]])
    return total, error


STEEP_N = 100  # at n = 1000 (51 s of CPU): 3.9e-7 off in kl[x0], 7.8e-9 in log_px, reported error 1.9e-6 (2026-12-02)
EDGE = torch.tensor([-20.0, -15.0])  # every bit's logit is 0.65 + EDGE . z: a steep boundary across both coordinates
NARROW_LOC = torch.tensor([[0.6, 0.4], [-0.6, -0.4]])
NARROW_SCALE = torch.tensor([[0.05, 0.02], [0.02, 0.05]])


def steep_diagonal_vae():
    """A latent_dim=2 VAE whose decoder gives every bit the logit 0.65 + EDGE . z (a steep boundary along a diagonal
    of the (z[0], z[1]) plane, so the likelihood depends on both coordinates), with a fixed narrow Gaussian guide
    beside it (scales 0.02-0.05): the recon of x0 is about 5e-6 nats, where float32 Bernoulli log-probs cancel."""
    data, model = OneBit(STEEP_N), VAE(STEEP_N, latent_dim=2)
    model.decoder = torch.nn.Linear(2, STEEP_N)
    with torch.no_grad():
        model.decoder.weight.copy_(EDGE.expand(STEEP_N, 2))
        model.decoder.bias.fill_(0.65)

    def guide(x):
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Normal(NARROW_LOC, NARROW_SCALE).to_event(1))

    return model, guide, data


def steep_diagonal_reference() -> dict:
    """recon, kl and log p(x_k) of steep_diagonal_vae by 1-D integrals: the likelihood depends on z only through
    s = a . z, a = EDGE / |EDGE|, which is N(0, 1) under the prior (rotation invariance) and N(a . m_k, |a * s_k|^2)
    under q(z|x_k); the KL of two Gaussians is closed-form."""
    norm = float(EDGE.norm())
    a = (EDGE / norm).double()

    def ll(s):  # log p(x0|s), log p(x1|s): (M, 2)
        f = 0.65 + norm * s
        return torch.stack([-STEEP_N * F.softplus(f), -STEEP_N * F.softplus(-f)], -1)

    lo, hi = -12.0, 12.0
    shift = ll(torch.linspace(lo, hi, 20001, dtype=torch.float64)).amax(0)
    mass, err = adaptive_1d(lambda s: (ll(s) - shift - 0.5 * s[:, None] ** 2 - 0.5 * math.log(2 * math.pi)).exp(),
                            lo, hi)
    out = {"log_px": (mass.log() + shift).tolist(), "recon": [], "kl": [], "errors": [err / float(mass.min())]}
    loc, scale = NARROW_LOC.double(), NARROW_SCALE.double()
    for k in range(2):
        m, sd = float(a @ loc[k]), float((a * scale[k]).norm())
        def integrand(e):  # -log p(x_k|s) N(e; 0, 1), s = m + sd e
            return (-ll(m + sd * e)[:, k] * torch.exp(-0.5 * e ** 2) / math.sqrt(2 * math.pi))[:, None]

        (recon,), err = adaptive_1d(integrand, -14.0, 14.0)
        out["recon"].append(float(recon))
        out["kl"].append(float((0.5 * (scale[k] ** 2 + loc[k] ** 2 - 1) - scale[k].log()).sum()))
        out["errors"].append(err)
    out["error"] = max(out["errors"])
    return out


def test_exact_integrates_a_steep_diagonal_boundary_and_a_narrow_guide_to_the_reference():
    """The decoder's boundary lies across both coordinates (p(x|u, v) is steep in v at every u) and q is 20-50x
    narrower than the prior."""
    model, guide, data = steep_diagonal_vae()
    result, ref = exact(model, guide, data), steep_diagonal_reference()
    assert ref["error"] < REFERENCE_MAX_ERROR
    diff = differences(result, ref, list(data.weights))
    worst = max(diff, key=diff.get)
    assert result["error"] <= MAX_ERROR and diff[worst] <= result["error"] + ref["error"], (worst, diff[worst])
    assert 1e-7 < ref["recon"][0] < 1e-4  # the float64 likelihood's regime


def test_evidence_of_a_two_dimensional_site_is_the_log_px_of_exact():
    model, guide, data = trained(5, 300)
    result, alone = exact(model, guide, data), evidence(model, guide, data)
    assert alone["log_px"] == pytest.approx(result["log_px"], abs=result["error"] + alone["error"])
    assert "2-D" in alone["estimator"]


def test_posterior_grid_of_a_two_dimensional_site_gives_each_coordinates_marginals():
    """Per coordinate z[k]: q's marginal is N(m_k, s_k^2) of the encoder, the prior's N(0, 1), and the posterior
    p(z_k|x) integrates to 1."""
    model, guide, data = trained(5, 300)
    grids = posterior_grid(model, guide, data, points=161)
    loc, scale = guide.encoder(data.x)
    for k in range(2):
        g = grids[f"z[{k}]"]
        z, step = torch.tensor(g["grid"]), float(g["grid"][1] - g["grid"][0])
        expected = torch.distributions.Normal(loc[:, k, None].double(), scale[:, k, None].double()).log_prob(z).exp()
        assert np.allclose(g["q"], expected.detach().numpy(), rtol=1e-6, atol=1e-9)
        assert np.allclose(g["prior"], torch.distributions.Normal(0.0, 1.0).log_prob(z).exp().numpy(), rtol=1e-9)
        for density in g["posterior"]:
            assert density.sum() * step == pytest.approx(1.0, abs=2e-3)


@torch.no_grad()
def surgery_reference(guide, data) -> dict:
    """mutual_info and marginal_kl of a GaussianGuide's q(z|x_k) = N(m_k, diag s_k^2) against p(z) = N(0, I), by
    cubature in each q_k's own noise: sum_k w_k E_qk[log q_k - log q_agg] and sum_k w_k E_qk[log q_agg - log p]."""
    loc, scale = copy.deepcopy(guide).double().encoder(one_bit(guide.n))
    w = torch.tensor(data.weights, dtype=torch.float64)  # data.w is float32 outside the quadrature

    def log_q(z, j):
        return log_normal((z - loc[j]) / scale[j]) - scale[j].log().sum()

    out, errors = {"mutual_info": 0.0, "marginal_kl": 0.0}, []
    for k in range(2):
        def integrand(eps):
            z = loc[k] + scale[k] * eps
            own = log_q(z, k)
            agg = torch.logaddexp(own + w[k].log(), log_q(z, 1 - k) + w[1 - k].log())
            return log_normal(eps).exp()[:, None] * torch.stack([own - agg, agg - log_normal(z)], -1)

        (mi, agg), err = cubature(integrand, ((-12.0, 12.0), (-12.0, 12.0)))
        out["mutual_info"] += float(w[k] * mi)
        out["marginal_kl"] += float(w[k] * agg)
        errors.append(err)
    out["error"] = max(errors)
    return out


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.8, 0.2)], ids=["equal", "unequal"])
def test_surgery_of_a_two_dimensional_site_agrees_with_the_reference_and_with_exact(weights):
    """avg KL = I_q(x; z) + KL(q(z) || p(z)) for z of two scalars: the average KL is exact()'s, the mutual
    information and the marginal KL those of an independent cubature with q(z) = sum_k w_k q(z|x_k)."""
    model, guide, _ = trained(5, 300)
    data = OneBit(5, weights=weights)
    s, result, ref = surgery(model, guide, data), exact(model, guide, data), surgery_reference(guide, data)
    assert ref["error"] < REFERENCE_MAX_ERROR
    assert s["avg_kl"] == pytest.approx(result["kl"]["z"], abs=s["error"] + result["error"])
    assert s["mutual_info"] == pytest.approx(ref["mutual_info"], abs=1e-9)
    assert s["marginal_kl"] == pytest.approx(ref["marginal_kl"], abs=1e-9)
    assert abs(s["residual"]) < 1e-12 and s["site"] == "z"


# ---------------------------------------------------------------- what stays refused
@pytest.mark.parametrize("model", [VAE(5, latent_dim=3), DLGM(5, latent_dim=2)], ids=["vae-3d", "dlgm-2x2"])
def test_more_than_two_scalar_latents_are_refused_in_one_line(model):
    data = OneBit(5)
    guide = GaussianGuide(model) if isinstance(model, VAE) else MeanFieldGuide(model)
    with pytest.raises(ValueError, match="at most 2 scalar latents per data point") as err:
        exact(model, guide, data)
    assert "\n" not in str(err.value)


def test_a_joint_guide_over_a_two_dimensional_site_is_refused_in_one_line():
    from pyro.infer.autoguide import AutoMultivariateNormal

    model, data = VAE(5, latent_dim=2), OneBit(5)
    guide = AutoMultivariateNormal(model)
    guide(data.x)
    with pytest.raises(ValueError, match="quadrature would be 4-D") as err:
        exact(model, guide, data)
    assert "\n" not in str(err.value)


