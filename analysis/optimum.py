"""The Gaussian-family optimum of the 1-layer VAE with equal data weights, by exact quadrature.

By symmetry the best Gaussian encoder is q(z|x1) = N(m, s^2), q(z|x0) = N(-m, s^2), and for a fixed encoder the
best decoder is q(x|z): every bit has logits u = log q(z|x1)/q(z|x0) = 2 m z / s^2. With a = 2 m^2 / s^2:

* recon = n E[softplus(-u)], u ~ N(a, 2a) (u given x1; x0 is the mirror image);
* KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - ln s^2) / 2 with m^2 = a s^2 / 2 is smallest at
  s^2 = 1 / (1 + a/2), i.e. s = sqrt(2 / (a + 2)), m = sqrt(a / (a + 2)) (so m^2 + s^2 = 1), where it is
  ln(1 + a/2) / 2.

So loss(a) = ln(1 + a/2) / 2 + n E[softplus(-u)], minimised over a >= 0. No 1-D Gaussian-encoder VAE can go below
it at that n; loss(0) = n ln 2 (the collapsed code).

    python -m analysis.optimum 1 2 5 10 100 1000
"""
import math
import sys

import numpy as np
from scipy import integrate, optimize

ESTIMATOR = "exact quadrature (scipy.integrate.quad) and bounded 1-D minimisation over a"
_LN2 = math.log(2.0)


def _log_softplus_neg(u):
    """log(softplus(-u)) = log(log1p(exp(-u))), stable for all u."""
    u = np.asarray(u, dtype=float)
    # u <= 30: direct; u > 30: log1p(e^-u) = e^-u (1 - e^-u/2 + ...), so log = -u + log1p(-e^-u/2 + e^-2u/3)
    direct = np.log(np.logaddexp(0.0, -np.minimum(u, 30.0)))
    y = np.exp(-np.maximum(u, 30.0))
    tail = -u + np.log1p(-y / 2 + y * y / 3)
    return np.where(u <= 30.0, direct, tail)


def _log_softplus_neg_scalar(u: float) -> float:
    """_log_softplus_neg for one Python float, with the math module's functions (the integrand is called a million
    times by a sweep's figures; numpy's per-call overhead was 6.5 of their 11 s)."""
    if u > 30.0:
        y = math.exp(-u)
        return -u + math.log1p(-y / 2 + y * y / 3)
    x = -u  # logaddexp(0, x), as numpy computes it
    return math.log(x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x)))


def _dlog_softplus_neg_scalar(u: float) -> float:
    """d/du log(softplus(-u)) = -sigmoid(-u) / softplus(-u), stable for all u (-1 for u >> 0, 1/u for u << 0)."""
    if u >= 0.0:
        y = math.exp(-u)  # sigmoid(-u) = y / (1 + y), softplus(-u) = log1p(y)
        return -1.0 / (1.0 + y) / (1.0 - y / 2 + y * y / 3) if y < 1e-8 else -(y / (1.0 + y)) / math.log1p(y)
    y = math.exp(u)  # sigmoid(-u) = 1 / (1 + y), softplus(-u) = -u + log1p(y)
    return -(1.0 / (1.0 + y)) / (-u + math.log1p(y))


# a stretch of the integrand everywhere below e^-600 (1e-261) adds nothing at 1e-13 and is not integrated: QUADPACK's
# error estimate over values near the underflow limit overflows (numpy's "RuntimeWarning: overflow encountered")
_LOG_NEGLIGIBLE = -600.0


def expected_softplus(a: float) -> float:
    """E[softplus(-u)] for u ~ N(a, 2a), to ~1e-13 absolute; ln 2 at a = 0.

    The integrand N(u; a, 2a) softplus(-u) is formed in log space and integrated over u with breakpoints at 0 and
    a; beyond a +- 40 standard deviations it is below e^-800. Its log is concave (a Gaussian log-density plus the
    concave log softplus), so the tangents at a stretch's ends bound it there from above: a stretch whose bound is
    below e^-600 (contributing less than 1e-255 in all) is skipped, which keeps QUADPACK's arithmetic away from the
    underflow limit (no floating-point overflow)."""
    a = float(a)
    if a < 0:
        raise ValueError(f"a must be >= 0, got {a!r}")
    if a == 0.0:
        return _LN2
    sd = math.sqrt(2.0 * a)
    if sd < 1e-6:  # Taylor: softplus(-u) = ln2 - u/2 + u^2/8 - u^4/192; E u^2 = a^2 + 2a, E u^4 = a^4 + 12a^3 + 12a^2
        return _LN2 - a / 2 + (a * a + 2 * a) / 8 - (a**4 + 12 * a**3 + 12 * a * a) / 192
    log_norm = -0.5 * math.log(2 * math.pi) - math.log(sd)

    def log_integrand(u):
        return log_norm - 0.5 * ((u - a) / sd) ** 2 + _log_softplus_neg_scalar(u)

    def slope(u):
        return -(u - a) / (sd * sd) + _dlog_softplus_neg_scalar(u)

    def integrand(u):
        return math.exp(log_integrand(u))

    def log_bound(left, right):
        """An upper bound of the log-integrand on [left, right], from the tangents at the ends (concavity)."""
        g_l, g_r, d_l, d_r = log_integrand(left), log_integrand(right), slope(left), slope(right)
        if d_l <= 0.0 or d_r >= 0.0 or d_l == d_r:  # monotone on the stretch: the larger end
            return max(g_l, g_r)
        cross = (g_r - g_l + d_l * left - d_r * right) / (d_l - d_r)  # where the two tangents meet
        return max(g_l, g_r, g_l + d_l * (cross - left))

    lo, hi = a - 40 * sd, a + 40 * sd
    total = 0.0
    # the integrand peaks at u = 0 with O(1) width once a is large: break there as well
    edges = sorted({lo, hi, a, *(c for c in (-20.0, -5.0, 0.0, 5.0, 20.0) if lo < c < hi)})
    edges = [e for e in edges if lo <= e <= hi]
    for left, right in zip(edges[:-1], edges[1:]):
        if right > left and log_bound(left, right) >= _LOG_NEGLIGIBLE:
            value, _ = integrate.quad(integrand, left, right, epsabs=0.0, epsrel=1e-12, limit=400)
            total += value
    return total


def gaussian_loss(a: float, n: float) -> float:
    """loss(a) = ln(1 + a/2)/2 + n E[softplus(-u)], u ~ N(a, 2a): the best loss of a Gaussian encoder with that a."""
    return 0.5 * math.log1p(a / 2) + n * expected_softplus(a)


def encoder(a: float) -> tuple:
    """(m, s) of the best encoder q(z|x1) = N(m, s^2) with 2 m^2 / s^2 = a (smallest KL to N(0, 1))."""
    return math.sqrt(a / (a + 2.0)), math.sqrt(2.0 / (a + 2.0))


def gaussian_optimum(n: float) -> dict:
    """The lowest loss any 1-D Gaussian-encoder VAE reaches on the equal-weight one-bit data of length n.

    Returns dict(a, m, s, kl, recon, recon_per_dim, loss, estimator), in nats per data point. The minimiser is
    bracketed on a log grid of a and refined by bounded Brent; the loss is accurate to ~1e-9. When no a > 0 beats
    the collapsed code by more than 1e-12 (n <= 1, where loss(a) - ln 2 = KL(q(z) || p(z)) is flat to high order
    at 0), a = 0 is reported."""
    from infer.validate import is_finite, refuse

    if not (is_finite(n) and n > 0):
        raise refuse("n", n, "n must be a finite number > 0 (the data length)")
    grid = np.concatenate([[0.0], np.logspace(-3, 3, 49)])
    values = np.array([gaussian_loss(a, n) for a in grid])
    i = int(np.argmin(values))
    if i == 0:  # collapsed (n <= 1): loss(a) - n ln2 >= 0 is flat near 0
        lo, hi = 0.0, grid[1]
    else:
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = optimize.minimize_scalar(gaussian_loss, bounds=(lo, hi), args=(n,), method="bounded",
                                   options={"xatol": 1e-12 * max(1.0, hi), "maxiter": 500})
    a, loss = (float(res.x), float(res.fun)) if res.fun <= values[i] else (float(grid[i]), float(values[i]))
    if loss >= values[0] - 1e-12:  # no a > 0 beats the collapsed code (n <= 1): report a = 0 exactly
        a = 0.0
    m, s = encoder(a)
    kl = 0.5 * math.log1p(a / 2)
    recon = n * expected_softplus(a)
    return {"a": a, "m": m, "s": s, "kl": kl, "recon": recon, "recon_per_dim": recon / n, "loss": kl + recon,
            "estimator": ESTIMATOR}


def table(ns) -> str:
    """The optimum over n as an aligned text table."""
    head = f"{'n':>6} {'m':>10} {'s':>10} {'KL':>10} {'recon':>10} {'recon/dim':>11} {'loss':>10}"
    rows = [head]
    for n in ns:
        o = gaussian_optimum(n)
        rows.append(f"{n:>6g} {o['m']:>10.6f} {o['s']:>10.6f} {o['kl']:>10.6f} {o['recon']:>10.6f} "
                    f"{o['recon_per_dim']:>11.4e} {o['loss']:>10.6f}")
    rows.append(f"(nats per data point; estimator: {ESTIMATOR}; ln 2 = {_LN2:.6f})")
    return "\n".join(rows)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        ns = [float(v) for v in argv] or [1, 5, 10, 100, 1000]
    except ValueError:
        print(f"error: arguments must be numbers n > 0, got {' '.join(argv)}", file=sys.stderr)
        sys.exit(2)
    print(table(ns))


if __name__ == "__main__":
    main()
