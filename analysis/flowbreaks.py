"""The breakpoints of a flow's map u = T(eps) in its base noise: where T is not smooth (for analysis.exact).

exact() integrates the expectations under a flow guide in the base noise eps of u = T(eps) (qdensity.BaseNoise), on
Gauss-Kronrod panels whose G7/K15 difference, and whose change when split, stand for their error. Both do only where
the integrand is smooth on the panel. A rational spline (Pyro's Spline and ConditionedSpline: the transforms of
conditional_spline in guides/flow.py) is one rational function of its input per piece; where two pieces meet, the
second derivative of T jumps (at +-bound, where the spline's end slope 1 - min_derivative meets the identity's 1, the
first derivative too). Its pieces are the bins between its knots (+-bound and the bin edges) and, for the
linear-rational order, the two parts of each bin on either side of its division point (lambda). A trained spline
has bins down to min_bin_width of its range and division points within min_lambda of a bin's edge, where T' peaks at
tens of times the bin's mean slope: the flow guide of tests/test_quadrature_accuracy.py (n = 1000, 2000 steps) puts
the whole sweep of z from -2.35 to -1.3, across the decoder's steep recon term, into eps in [-5, -4.98], with knots
at -5 and -4.957 and a division point at -4.9986. A panel across those points was 3.9e-6 off in recon[x0] while its
G7/K15 difference said 4e-7, and splitting it moved it by 1e-6: exact() reported an error of 2.2e-6 and was 3.4e-6
off. With every breakpoint as a panel edge, each panel's integrand is smooth, and exact() reported 4.3e-8 and was
7.5e-9 off.

flow_breaks() gives those points in eps: a spline's breakpoints lie in its own input, the output of the transforms
before it, so they are the preimages under those transforms, found by bisection of their forward map (a scalar
bijection, so monotone; forward maps only, as BaseNoise). Transforms of other kinds add none (an affine map is
smooth).
"""
import functools
import inspect

import torch
from pyro.distributions.transforms.spline import ConditionedSpline, _calculate_knots, _monotonic_rational_spline
from torch.distributions.transforms import ComposeTransform

# the spline's own constraints on its parameters, which ConditionedSpline.spline_op leaves at their defaults
_SPLINE_DEFAULTS = {name: p.default for name, p in inspect.signature(_monotonic_rational_spline).parameters.items()}
BISECTION_STEPS = 64  # halvings of [lo, hi] (to 2^-64 of its width): down to float64's resolution in it


def spline_breaks(transform) -> "torch.Tensor | None":
    """The breakpoints of a Pyro rational spline in its input, (..., K) sorted, float64: -bound and bound (the
    identity beyond), the inner knots between its bins and, for the linear order, each bin's division point; None for
    any other transform. They follow _monotonic_rational_spline's construction from the spline's parameters, in the
    parameters' dtype, where the spline switches formulas: an inner knot's next bin starts `eps` (1e-6) right of it
    (its bin search compares with the knots + eps). min_bin_width, min_lambda and eps are its defaults, which
    spline_op uses."""
    if not isinstance(transform, ConditionedSpline):
        return None
    params = transform._params() if callable(transform._params) else transform._params
    widths, lambdas = params[0].detach(), params[3]
    bins, bound = widths.shape[-1], float(transform.bound)
    least = _SPLINE_DEFAULTS["min_bin_width"]
    widths, knots = _calculate_knots(least + (1.0 - least * bins) * widths, -bound, bound)
    points = [knots[..., :1], knots[..., 1:-1] + _SPLINE_DEFAULTS["eps"], knots[..., -1:]]
    if lambdas is not None:  # the linear order: each bin is two rational pieces, split where theta = lambda, with
        least = _SPLINE_DEFAULTS["min_lambda"]  # theta = (x - knot) / width in x's dtype (float64 here)
        lambdas = (1 - 2 * least) * lambdas.detach() + least
        points.append(knots[..., :-1].double() + lambdas.double() * widths.double())
    return torch.cat([p.double() for p in points], -1).sort(-1).values


def _flat(transforms) -> list:
    """transforms (in the order they act) with every ComposeTransform unpacked into its parts."""
    out = []
    for t in transforms:
        out += _flat(t.parts) if isinstance(t, ComposeTransform) else [t]
    return out


def _through(base, transforms, eps: torch.Tensor) -> torch.Tensor:
    """`transforms` applied in turn to eps (..., N) in the site's layout (a trailing event dim, as BaseNoise feeds
    them), on the site's device, float64 where they accept it (else the site's own dtype): float64 (..., N) on eps's
    device."""
    def run(dtype):
        y = eps[..., None].to(device=base.device, dtype=dtype)
        for t in transforms:
            y = t(y)
        return y

    with torch.no_grad():
        try:
            y = run(torch.float64)
        except (RuntimeError, TypeError):  # a transform with float32 parameters that refuses float64 input
            y = run(base.dtype)
    return y.reshape(eps.shape).to(device=eps.device, dtype=torch.float64)


def preimage(forward, y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """x in [lo, hi] (N,) with forward(x) = y, for y (K, N) and a continuous monotone (rising or falling) forward map
    (K, N) -> (K, N), by bisection (BISECTION_STEPS halvings); lo or hi where y lies beyond forward's value there."""
    a, b = lo.expand_as(y).clone(), hi.expand_as(y).clone()
    rising = forward(b) >= forward(a)
    for _ in range(BISECTION_STEPS):
        mid = (a + b) / 2
        right = (forward(mid) < y) == rising  # the preimage lies right of mid
        a, b = torch.where(right, mid, a), torch.where(right, b, mid)
    return (a + b) / 2


def flow_breaks(base, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The breakpoints in eps of the flow of a qdensity.BaseNoise (u = T(eps), one scalar per data point): (F, N)
    float64, per data point sorted and within its [lo, hi] (N,) (those beyond it land on lo or hi); (0, N) for a flow
    without splines. Each spline's breakpoints (spline_breaks) are mapped back through the transforms before it."""
    points = lo.shape[0]
    transforms, out = _flat(base.fn.transforms), []
    for i, t in enumerate(transforms):
        b = spline_breaks(t)
        if b is None:
            continue
        try:  # the spline's input per data point: (N, 1) (the site's event dim), K breakpoints each
            b = b.to(lo.device).broadcast_to((points, 1, b.shape[-1])).reshape(points, -1).T
        except RuntimeError:  # a layout other than one scalar per data point: no breakpoints to place
            continue
        if i:
            b = preimage(functools.partial(_through, base, transforms[:i]), b, lo, hi)
        out.append(torch.maximum(torch.minimum(b, hi), lo))
    if not out:
        return lo.new_zeros((0, points))
    return torch.cat(out).sort(0).values
