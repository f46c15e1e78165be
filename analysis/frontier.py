"""The exact rate-distortion frontier of the 1-layer VAE with a Gaussian encoder (Alemi et al. 2018, "Fixing a
Broken ELBO"), on the equal-weight one-bit data x0 = 0^n, x1 = 1^n, with a scalar latent (d = 1).

Rate R = KL(q(z|x) || p(z)) averaged over the data, distortion D = -E_q log p(x|z) (the reconstruction term);
R + D is the loss (negative ELBO), in nats per data point.

The claim. No Gaussian encoder, with any decoder, lies below the curve

    R(a) = 1/2 ln(1 + a/2),    D(a) = n E[softplus(-u)],  u ~ N(a, 2a),    a >= 0,

i.e. D >= distortion_at_rate(n, R) for every such run. Why (the reduction behind analysis.optimum):

* any decoder: every bit of x equals the data point's label, so each bit's cross-entropy is at least H_q(X|Z), the
  conditional entropy of the label under the encoder's joint q(x, z) = w_x q(z|x); hence D >= n H_q(X|Z), with
  equality for the decoder that outputs q(x1|z) on every bit;
* equal-variance encoders q(z|x_k) = N(m_k, s^2): H_q(X|Z) = E[softplus(-u)] with u the log-likelihood ratio of the
  two Gaussians, u ~ N(a, 2a) given x1, a = (m1 - m0)^2 / (2 s^2); for a fixed a the average KL is smallest at
  m1 = -m0 = sqrt(a / (a + 2)), s^2 = 2 / (a + 2), where it is R(a). So at any rate no equal-variance encoder
  beats D(a(R)), and a = 2 (e^{2R} - 1) inverts R(a);
* unequal variances: not proven here; verified numerically (minimising n H_q(X|Z) + beta R over (m0, s0, m1, s1)
  from random starts never went below the curve's minimum, n in {1, 5, 20}, beta in {0.3, 0.7, 1, 2}), and
  tests/test_frontier.py checks random encoders against the curve.

The absolute bound R + D >= H(w) = ln 2 holds for every model and every family (R + D >= -log p(x) averaged,
whose least value is the data's entropy); the frontier lies above it.

A beta-VAE minimises D + beta R. On this data, for any encoder, D + beta R - n ln 2 >= (beta - n) R +
n KL(q(z) || p(z)) (using D >= n H_q(X|Z) = n (ln 2 - I_q) and R = I_q + KL(q(z) || p(z))), so for beta >= n no
encoder of any family gets D + beta R below n ln 2, the collapsed code R = 0, D = n ln 2 reaches it, and it is the
only optimum for beta > n (for Gaussian encoders also at beta = n: their q(z) is N(0, 1) only when collapsed; at
n = beta = 1 a richer family can reach it anywhere on the line R + D = ln 2); for beta < n the curve's slope at
R = 0 is dD/dR = -n < -beta (D(a) = n (ln 2 - a/4 + O(a^2)), R(a) = a/4 + O(a^2)), so the optimum leaves collapse.
At n = 1: z is used exactly when beta < 1.

Every number here is exact (deterministic quadrature, analysis.optimum.expected_softplus, ~1e-13 relative), tag
[exact], in nats per data point.

    python -m analysis.frontier --n 5 --beta 0.5
"""
import argparse
import math

import numpy as np
from scipy import optimize

from .optimum import expected_softplus

LN2 = math.log(2.0)
ESTIMATOR = "exact"
UNIT = "nats per data point"
RATE_TOLERANCE = 1e-6  # a measured rate in [-RATE_TOLERANCE, 0) is quadrature error on a KL >= 0 and is read as 0


def _check_n(n) -> float:
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)) or not (
            math.isfinite(n) and n > 0):
        raise ValueError(f"n must be a finite number > 0, got {n!r}")
    return float(n)


def _check_rates(rates, name="rate") -> np.ndarray:
    r = np.asarray(rates, dtype=float)
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError(f"{name} must be finite numbers >= 0, got {rates!r}")
    if np.any(r < -RATE_TOLERANCE):
        raise ValueError(f"{name} must be >= 0 (a KL), got {float(r.min())!r}")
    return np.maximum(r, 0.0)


def rate(a):
    """R(a) = 1/2 ln(1 + a/2): the least average KL(q(z|x) || N(0, 1)) of a Gaussian encoder with separation a."""
    a = np.asarray(a, dtype=float)
    return 0.5 * np.log1p(a / 2.0)


def separation_at_rate(R):
    """a = 2 (e^{2R} - 1), the inverse of rate(a) (expm1: exact near R = 0); inf beyond float64's range (R > 354)."""
    with np.errstate(over="ignore"):
        return 2.0 * np.expm1(2.0 * np.asarray(R, dtype=float))


def distortion(n, a):
    """D(a) = n E[softplus(-u)], u ~ N(a, 2a): the least distortion of a Gaussian encoder with separation a, any
    decoder. Float64 quadrature (analysis.optimum.expected_softplus); D(0) = n ln 2, and D(inf) = 0, its limit (already
    below 1e-300 at a = 1e6): the separation of a rate above 354 nats, beyond float64's range."""
    n = _check_n(n)
    a = np.asarray(a, dtype=float)
    if np.any(np.isnan(a)) or np.any(a < 0):
        raise ValueError(f"a must be numbers >= 0, got {a!r}")
    return n * np.vectorize(lambda x: 0.0 if x == np.inf else expected_softplus(x), otypes=[float])(a)


def distortion_at_rate(n, R):
    """D_frontier(R): the least distortion any Gaussian encoder (any decoder) reaches at rate R, in nats per data
    point [exact]. R may be a number or an array (same shape returned); rates in [-1e-6, 0) count as 0."""
    n = _check_n(n)
    r = _check_rates(R, "R")
    d = distortion(n, separation_at_rate(r))
    return float(d) if np.ndim(R) == 0 else d


def frontier(n, rates=None, *, a=None, points: int = 101, max_rate: float = None):
    """The curve as arrays (R, D), float64, nats per data point [exact].

    Give the rates (R >= 0), or the separations a (a >= 0), or neither: then `points` rates evenly spaced on
    [0, max_rate] (default max_rate: 1.25 times the rate of the beta = 0.1 point, at least 1 nat)."""
    n = _check_n(n)
    if rates is not None and a is not None:
        raise ValueError("give rates or a, not both")
    if a is not None:
        a = np.asarray(a, dtype=float)
        return rate(a), distortion(n, a)
    if rates is None:
        if not isinstance(points, int) or isinstance(points, bool) or points < 2:
            raise ValueError(f"points must be an integer >= 2, got {points!r}")
        if max_rate is None:
            max_rate = max(1.0, 1.25 * beta_point(n, 0.1)["rate"])
        if not (isinstance(max_rate, (int, float)) and math.isfinite(max_rate) and max_rate > 0):
            raise ValueError(f"max_rate must be a finite number > 0, got {max_rate!r}")
        rates = np.linspace(0.0, max_rate, points)
    r = _check_rates(rates, "rates")
    return r, distortion(n, separation_at_rate(r))


def beta_point(n, beta) -> dict:
    """The point of the curve where D + beta R is smallest: where a beta-VAE with a Gaussian encoder should land.

    Returns dict(n, beta, a, rate, distortion, loss = R + D, objective = D + beta R, collapsed, estimator), nats
    per data point. For beta >= n it is the collapsed code a = 0, R = 0, D = n ln 2, exactly (proof in the module
    docstring); for 0 < beta < n it has a > 0 (the slope argument), found by a log grid over a and bounded Brent in
    log a, the objective accurate to ~1e-12 (a itself only as well as the flat minimum allows). beta must be > 0: at
    beta = 0 the infimum is at R = infinity."""
    n = _check_n(n)
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)) or not (
            math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (at beta = 0 the optimum is at infinite rate), "
                         f"got {beta!r}")
    beta = float(beta)
    if beta >= n:
        a = 0.0
    else:
        def objective(x):
            return n * expected_softplus(x) + beta * 0.5 * math.log1p(x / 2.0)

        grid = np.logspace(-8, 6, 29)  # bracket on a log grid (the objective is unimodal in R: D(R) is convex)
        values = np.array([objective(x) for x in grid])
        i = int(np.argmin(values))
        lo = math.log(grid[i - 1]) if i > 0 else math.log(1e-12)
        hi = math.log(grid[min(i + 1, len(grid) - 1)])
        res = optimize.minimize_scalar(lambda t: objective(math.exp(t)), bounds=(lo, hi), method="bounded",
                                       options={"xatol": 1e-11, "maxiter": 500})
        a = math.exp(res.x) if res.fun <= values[i] else float(grid[i])
    R = float(rate(a))
    D = n * LN2 if a == 0.0 else float(distortion(n, a))
    return {"n": n, "beta": beta, "a": a, "rate": R, "distortion": D, "loss": R + D,
            "objective": D + beta * R, "collapsed": a == 0.0, "estimator": ESTIMATOR}


def distortion_above_frontier(n, rate, distortion) -> float:
    """D - D_frontier(R): how far a run's distortion lies above the Gaussian-encoder frontier at its own rate, in
    nats per data point.

    For a 1-layer VAE with a Gaussian guide (d = 1, equal weights) it is >= 0 up to the integration error of the
    run's (R, D); pass the run's exact numbers (R = sum of exact['kl'], D = exact['recon']). Below 0 beyond that
    error means a better family than a Gaussian encoder (a flow, a DLGM). A rate in [-1e-6, 0) counts as 0."""
    if isinstance(distortion, bool) or not isinstance(distortion, (int, float, np.integer, np.floating)) or not (
            math.isfinite(distortion)):
        raise ValueError(f"distortion must be a finite number, got {distortion!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise ValueError(f"rate must be a number >= 0, got {rate!r}")
    return float(distortion) - distortion_at_rate(n, float(rate))


# ---------------------------------------------------------------------------------------------------------------
# the command


def table(n, beta, rows: int = 9) -> str:
    """The curve at `rows` evenly spaced rates up to 1.5 times the beta point's rate (at least 1 nat), and the
    beta point, as aligned text; every number [exact], nats per data point."""
    n = _check_n(n)
    point = beta_point(n, beta)
    R, D = frontier(n, points=rows, max_rate=max(1.0, 1.5 * point["rate"]))
    tag = f"[{ESTIMATOR}]"
    head = (f"{'R ' + tag:>14} {'D ' + tag:>14} {'R+D ' + tag:>14} {'D+beta R ' + tag:>17}")
    lines = [f"Gaussian-encoder frontier of the 1-layer VAE, n = {n:g}, beta = {point['beta']:g} ({UNIT})", head]
    for r, d in zip(R, D):
        lines.append(f"{r:>14.6f} {d:>14.6f} {r + d:>14.6f} {d + point['beta'] * r:>17.6f}")
    state = "collapsed: z unused" if point["collapsed"] else "z used"
    lines.append(f"beta-VAE point (least D + beta R; {state}, a = {point['a']:.6g}):")
    lines.append(f"  R {point['rate']:.6f} {tag}   D {point['distortion']:.6f} {tag}   R+D {point['loss']:.6f} {tag}"
                 f"   D+beta R {point['objective']:.6f} {tag}  ({UNIT})")
    lines.append(f"bounds: R + D >= ln 2 = {LN2:.6f} for every model and family; no Gaussian encoder lies below "
                 f"this curve (d = 1, equal weights)")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message}\n")


def main(argv=None) -> None:
    parser = _Parser(prog="python -m analysis.frontier",
                     description="Print the exact Gaussian-encoder rate-distortion frontier and the beta-VAE point.")
    parser.add_argument("--n", type=float, default=5.0, help="data dimension n > 0 (default 5)")
    parser.add_argument("--beta", type=float, default=1.0, help="KL weight beta > 0 (default 1)")
    parser.add_argument("--rows", type=int, default=9, help="rows of the curve, >= 2 (default 9)")
    args = parser.parse_args(argv)
    try:
        print(table(args.n, args.beta, args.rows))
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
