"""The breakpoints of a flow's map in its base noise (analysis.flowbreaks), where exact() starts its panels in eps.

A linear-rational spline is one Moebius map x -> (a + b x) / (c + d x) per piece (each bin's two parts on either side
of its division point, and the identity beyond +-bound), and so is an affine map and any composition of them. A
Moebius map has T' = (b c - a d) / (c + d x)^2, so |T'|^(-1/2) is affine in x. Between two consecutive breakpoints of
flow_breaks, then, |dT/d eps|^(-1/2) of the whole map eps -> u = T(eps) is affine in eps, however many splines T
composes, and at each breakpoint its slope changes (where two pieces meet, T' is continuous and T'' jumps): that is
what being the breakpoints means, checked on the map's log-Jacobian (BaseNoise) without reading the splines.
"""
import pytest
import torch

from analysis.densities import Densities
from analysis.flowbreaks import flow_breaks
from guides import FlowGuide
from models import VAE, OneBit

torch.set_num_threads(1)
N = 20
LO, HI = torch.full((2,), -12.0, dtype=torch.float64), torch.full((2,), 12.0, dtype=torch.float64)


def base_noise(flows: int, seed: int, order: str = "linear"):
    """The BaseNoise of a flow guide's z whose nets are perturbed, so that its bins are uneven: the map's pieces in
    eps come down to 1e-4 wide with one spline, 1e-10 with two (a piece of the first spline that the second cuts)."""
    torch.manual_seed(seed)
    model = VAE(N)
    guide = FlowGuide(model, flows=flows, order=order)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return Densities(model, guide, OneBit(N)).base


def bend(base, left, mid, right):
    """The relative change of the slope of g = |dT/d eps|^(-1/2) from [left, mid] to [mid, right] (each (M, 2)); 0
    where g is constant on both (the identity beyond +-bound, under the affine map)."""
    def g(eps):
        _, log_q, log_base = base(eps)  # log q(u) = log base(eps) - log|dT/d eps|
        return ((log_q - log_base) / 2).exp()

    g_left, g_mid, g_right = g(left), g(mid), g(right)
    slope_left, slope_right = (g_mid - g_left) / (mid - left), (g_right - g_mid) / (right - mid)
    steeper = torch.maximum(slope_left.abs(), slope_right.abs())
    return torch.where(steeper > 0, (slope_left - slope_right).abs() / steeper, torch.zeros_like(steeper))


@pytest.mark.parametrize("flows,seed", [(1, 0), (1, 4), (2, 0), (2, 4)])
def test_the_map_is_one_moebius_map_between_consecutive_breakpoints(flows, seed):
    base = base_noise(flows, seed)
    breaks = torch.cat([LO[None], flow_breaks(base, LO, HI), HI[None]])
    assert breaks.shape[0] == 2 + flows * 17  # 8 bins: 9 knots and 8 division points per spline
    a, b = breaks[:-1], breaks[1:]
    a, b = a[(b > a).all(1)], b[(b > a).all(1)]  # a later spline's +-bound maps back onto the first one's: width 0
    assert float(bend(base, a + 0.2 * (b - a), a + 0.5 * (b - a), a + 0.8 * (b - a)).max()) < 1e-5


@pytest.mark.parametrize("flows,seed", [(1, 0), (1, 4), (2, 0), (2, 4)])
def test_at_each_breakpoint_the_map_turns_into_another_moebius_map(flows, seed):
    base = base_noise(flows, seed)
    breaks = flow_breaks(base, LO, HI)
    edges = torch.cat([LO[None], breaks, HI[None]])
    reach = torch.minimum(edges[1:-1] - edges[:-2], edges[2:] - edges[1:-1])  # half-way to the nearer neighbour
    keep = (reach > 0).all(1)  # one of each pair of equal breakpoints
    breaks, reach = breaks[keep], reach[keep] / 2
    assert float(bend(base, breaks - reach, breaks, breaks + reach).min()) > 1e-4


def test_a_quadratic_spline_breaks_at_its_knots_only():
    breaks = flow_breaks(base_noise(1, 0, "quadratic"), LO, HI)
    assert breaks.shape == (9, 2)
    assert bool((breaks[0] == -5).all() and (breaks[-1] == 5).all())  # the bound, where the identity takes over


def test_breakpoints_beyond_the_range_land_on_its_ends():
    lo, hi = torch.full((2,), -1.0, dtype=torch.float64), torch.full((2,), 1.0, dtype=torch.float64)
    breaks = flow_breaks(base_noise(2, 0), lo, hi)
    assert breaks.shape == (34, 2)
    assert bool(((breaks >= -1) & (breaks <= 1)).all() and (breaks.diff(dim=0) >= 0).all())
