"""The exact Gaussian-encoder rate-distortion frontier of the 1-layer VAE (analysis.frontier)."""
import functools
import math

import numpy as np
import pytest
from scipy import integrate

from analysis.frontier import (LN2, beta_point, distortion, distortion_above_frontier, distortion_at_rate, frontier,
                               main, rate, separation_at_rate)
from analysis.rd_plane import rd_plane
from analysis.optimum import gaussian_optimum


@pytest.mark.parametrize("n", [1, 5, 1000])
def test_the_beta_one_point_is_the_gaussian_family_optimum(n):
    point, best = beta_point(n, 1.0), gaussian_optimum(n)
    assert point["rate"] == pytest.approx(best["kl"], abs=1e-6)
    assert point["distortion"] == pytest.approx(best["recon"], abs=1e-6)
    assert point["loss"] == pytest.approx(best["loss"], abs=1e-6)


@pytest.mark.parametrize("beta", [1.0, 1.0 + 1e-9, 1.5, 2.0, 10.0])
def test_at_n_1_a_beta_vae_with_beta_at_least_1_sits_exactly_at_the_collapsed_code(beta):
    point = beta_point(1, beta)
    assert point["collapsed"] and point["a"] == 0.0 and point["rate"] == 0.0
    assert point["distortion"] == LN2


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9, 0.99, 0.999])
def test_at_n_1_a_beta_vae_with_beta_below_1_leaves_collapse_and_beats_it(beta):
    point = beta_point(1, beta)
    assert not point["collapsed"] and point["rate"] > 0
    assert point["objective"] < LN2 - 1e-6  # strictly better than the collapsed code's D + beta R = ln 2


def test_in_general_the_code_collapses_exactly_when_beta_is_at_least_n():
    assert beta_point(5, 5.0)["collapsed"] and beta_point(5, 7.0)["collapsed"]
    below = beta_point(5, 4.9)
    assert below["rate"] > 0 and below["objective"] < 5 * LN2 - 1e-3


@pytest.mark.parametrize("n, beta", [(5, 0.25), (5, 1.0), (5, 2.0), (1, 0.5), (1000, 1.0)])
def test_the_beta_point_is_where_the_curve_has_slope_minus_beta(n, beta):
    point = beta_point(n, beta)
    h = 1e-4
    slope = (distortion_at_rate(n, point["rate"] + h) - distortion_at_rate(n, point["rate"] - h)) / (2 * h)
    assert slope == pytest.approx(-beta, rel=1e-4)


@pytest.mark.parametrize("n", [1, 5, 1000])
def test_the_curve_never_goes_below_the_absolute_bound_ln_2(n):
    R, D = frontier(n, np.linspace(0.0, 4.0, 161))
    assert np.all(R + D >= LN2 - 1e-12)


@pytest.mark.parametrize("n", [1, 5, 1000])
def test_the_curve_falls_and_is_convex(n):
    R, D = frontier(n, np.linspace(0.0, 3.0, 121))
    assert D[0] == pytest.approx(n * LN2, abs=1e-12)
    assert np.all(np.diff(D) < 0)
    assert np.all(np.diff(D, 2) >= -1e-12)


def test_distortion_at_rate_inverts_the_rate_of_the_separation():
    a = np.array([0.0, 1e-6, 0.3, 4.0, 40.0])
    assert separation_at_rate(rate(a)) == pytest.approx(a, rel=1e-12, abs=1e-15)
    assert distortion_at_rate(5, rate(a)) == pytest.approx(distortion(5, a), rel=1e-10)
    R, D = frontier(5, a=a)
    assert R == pytest.approx(rate(a)) and D == pytest.approx(distortion(5, a))


@pytest.mark.parametrize("a", [0.05, 2.0, 30.0, 70.0, 110.0])
def test_the_distortion_is_accurate_to_1e_8_at_n_1e6(a):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    a_, sd = mpmath.mpf(a), mpmath.sqrt(2 * mpmath.mpf(a))

    def integrand(u):
        return mpmath.npdf(u, a_, sd) * mpmath.log1p(mpmath.exp(-u))

    points = sorted({a_ - 40 * sd, a_ + 40 * sd, a_, *(mpmath.mpf(c) for c in (-20, -5, 0, 5, 20)
                                                       if a_ - 40 * sd < c < a_ + 40 * sd)})
    reference = 10**6 * mpmath.quad(integrand, points)
    assert abs(float(distortion(1e6, a)) - float(reference)) < 1e-8


def _conditional_entropy(m0, s0, m1, s1):
    """H(X|Z) under q(x, z) = q(z|x) / 2 with q(z|x_k) = N(m_k, s_k^2): the least distortion per bit of any decoder."""
    def lq(z, m, s):
        return -0.5 * ((z - m) / s) ** 2 - math.log(s)

    total = 0.0
    for (ma, sa, mb, sb) in ((m1, s1, m0, s0), (m0, s0, m1, s1)):
        def f(e):  # z = ma + sa e drawn from q(z|x_a); -log q(x_a|z) = softplus(-(log q_a - log q_b))
            z = ma + sa * e
            return math.exp(-0.5 * e * e) / math.sqrt(2 * math.pi) * np.logaddexp(0.0, lq(z, mb, sb) - lq(z, ma, sa))
        total += 0.5 * integrate.quad(f, -40, 40, points=[-5, 0, 5], epsabs=1e-14, epsrel=1e-12, limit=400)[0]
    return total


@pytest.mark.parametrize("n", [1, 5])
def test_random_gaussian_encoders_with_their_best_decoder_lie_on_or_above_the_curve(n):
    rng = np.random.default_rng(n)
    for _ in range(25):
        m0, m1 = rng.normal(scale=1.5, size=2)
        s0, s1 = np.exp(rng.normal(scale=0.7, size=2))
        R = 0.25 * sum(m * m + s * s - 1 - 2 * math.log(s) for m, s in ((m0, s0), (m1, s1)))
        D = n * _conditional_entropy(m0, s0, m1, s1)
        assert distortion_above_frontier(n, R, D) >= -1e-9


def test_a_trained_vae_with_a_gaussian_guide_is_not_below_the_curve():
    import torch

    from analysis.exact import exact
    from guides import GaussianGuide
    from infer import ClosedFormELBO, fit
    from models import VAE, OneBit

    torch.set_num_threads(1)
    data = OneBit(5)
    model = VAE(data.n, hidden=32, gain=True)
    guide = GaussianGuide(model, hidden=32)
    fit(model, guide, data, elbo=ClosedFormELBO(num_particles=32, noise="lattice"), steps=1500, beta=0.5, seed=0)
    ex = exact(model, guide, data)
    above = distortion_above_frontier(data.n, sum(ex["kl"].values()), ex["recon"])
    assert above >= -(ex["error"] + 1e-9)
    assert above < 0.05  # trained: near the curve, so the check above has something to miss


def test_the_command_prints_the_curve_and_the_beta_point_with_estimator_and_unit(capsys):
    main(["--n", "5", "--beta", "0.5"])
    out = capsys.readouterr().out
    point = beta_point(5, 0.5)
    assert "[exact]" in out and "nats per data point" in out
    assert f"R {point['rate']:.6f} [exact]" in out and f"D {point['distortion']:.6f} [exact]" in out


@pytest.mark.parametrize("argv", [["--n", "0"], ["--n", "-3"], ["--beta", "0"], ["--beta", "abc"], ["--rows", "1"],
                                  ["--bogus"]])
def test_the_command_refuses_bad_arguments_in_one_line_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("call", [lambda: beta_point(0, 1), lambda: beta_point(5, 0), lambda: beta_point(5, -1),
                                  lambda: distortion_at_rate(5, -0.1), lambda: distortion_at_rate(5, float("nan")),
                                  lambda: distortion_above_frontier(5, 0.3, float("inf")),
                                  lambda: frontier(5, rates=[0.1], a=[1.0])])
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_a_rate_a_hair_below_zero_is_quadrature_error_and_counts_as_zero():
    assert distortion_at_rate(5, -1e-9) == pytest.approx(5 * LN2, abs=1e-12)


@functools.lru_cache(maxsize=None)
def _point(n, beta):
    return beta_point(n, beta)


def _runs(count):
    families = [("vae", "gaussian"), ("vae", "flow"), ("dlgm", "structured")]
    points = []
    for i in range(count):
        n, beta = (1, 5)[i % 2], (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2)[i % 7]
        model, guide = families[i % 3]
        p = _point(n, beta)
        points.append({"rate": p["rate"], "distortion": p["distortion"] * (1 if guide == "gaussian" else 0.8),
                       "model": model, "guide": guide, "beta": beta, "n": n})
    return points


@pytest.mark.parametrize("count", [1, 42])
def test_the_plane_figure_is_written_for_one_to_many_runs(count, tmp_path):
    path, runs = tmp_path / "rd.png", _runs(count)
    fig = rd_plane(runs, path)
    assert path.stat().st_size > 10_000
    assert len(fig.axes) == len({p["n"] for p in runs})


@pytest.mark.parametrize("left", ["", "\n(1 run(s) on unequal data weights left out: frontier and ln 2 are for equal "
                                  "weights)"])
def test_the_plane_figures_title_fits_in_a_one_panel_figure(left, tmp_path):
    title = "Rate-distortion plane: runs (exact R, D) against the exact Gaussian-encoder frontier" + left
    fig = rd_plane(_runs(1), tmp_path / "rd.png", title=title if left else None)
    box = fig._suptitle.get_window_extent()  # as the saved file drew it
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width  # was cut off at the right edge


def test_the_plane_figure_refuses_a_point_without_its_keys(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        rd_plane([{"rate": 0.1, "distortion": 0.5, "model": "vae", "guide": "gaussian", "n": 5}], tmp_path / "x.png")
