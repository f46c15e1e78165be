"""Globally adaptive Gauss-Kronrod (7, 15) quadrature in the outer latent u, per data point, and its refinement.

The rule (QUADPACK qk15) on [-1, 1] and log-space sums (lse) serve every integral of analysis.exact. Panels are
(P, 2, 2): [a, b] per data point. Outer integrates the quantities that an integrand function returns per u node,
splitting the panels whose G7/K15 difference is largest until the errors sum below tol / 4 (or stagnate); adapt
extends the range until the integrands vanish at both ends; refine splits every panel and raises the inner level
(finer seeded panels, tighter tolerance) until the reported numbers change by less than tol (that change is the
reported error); initial_breaks places the first breakpoints from draws. See analysis.exact for the whole method.
"""
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .densities import Densities

# Gauss-Kronrod (7, 15) on [-1, 1] (QUADPACK qk15): Kronrod nodes x >= 0, Kronrod weights, Gauss weights of the
# odd-indexed nodes (x[1], x[3], x[5], x[7] = 0).
_XK = np.array([0.991455371120812639206854697526329, 0.949107912342758524526189684047851,
                0.864864423359769072789712788640926, 0.741531185599394439863864773280788,
                0.586087235467691130294144845693013, 0.405845151377397166906606412076961,
                0.207784955007898467600689403773245, 0.0])
_WK = np.array([0.022935322010529224963732008058970, 0.063092092629978553290700663189204,
                0.104790010322250183839876322541518, 0.140653259715525918745189590510238,
                0.169004726639267902826583426598550, 0.190350578064785409913256402421014,
                0.204432940075298892414161999234649, 0.209482141084727828012999174891714])
_WG = np.array([0.129484966168869693270611432679082, 0.279705391489276667901467771423780,
                0.381830050505118944950369775488975, 0.417959183673469387755102040816327])
KRONROD_X = torch.tensor(np.concatenate([-_XK[:-1], _XK[::-1]]), dtype=torch.float64)  # 15 nodes, ascending
KRONROD_W = torch.tensor(np.concatenate([_WK[:-1], _WK[::-1]]), dtype=torch.float64)
_g = np.zeros(15)
_g[[1, 3, 5]], _g[7], _g[[9, 11, 13]] = _WG[:3], _WG[3], _WG[:3][::-1]
GAUSS7_W = torch.tensor(_g, dtype=torch.float64)  # zero on the Kronrod-only nodes
TAIL_NEGLIGIBLE = 1e-30  # end panels whose every integral is below this fraction of its total are not refined


def lse(t, dim):
    """logsumexp that returns -inf (not nan) for all -inf slices."""
    m = t.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (t - m).exp().sum(dim).log() + m.squeeze(dim)


def _kronrod(panels):
    """Kronrod nodes (P, 15, 2) and half-widths (P, 1, 2) of panels (P, 2, 2) = [a, b] per data point."""
    a, b = panels[:, 0], panels[:, 1]
    mid, half = (a + b) / 2, (b - a) / 2
    return mid[:, None] + half[:, None] * KRONROD_X[None, :, None], half[:, None]


class Outer:
    """Globally adaptive G7/K15 quadrature in u of the quantities an integrand function returns per u node."""

    def __init__(self, dens: "Densities", fn, quantities, tol: float, shared: bool = False):
        self.d, self.fn, self.quantities, self.tol, self.shared = dens, fn, quantities, tol, shared

    def evaluate(self, panels, level):
        """Per panel (P, 2) Kronrod and Gauss estimates of each quantity: dict name -> (K, G), each (P, 2)."""
        nodes, half = _kronrod(panels)
        P = panels.shape[0]
        res = self.fn(nodes.reshape(P * 15, 2), level)
        res = {k: v.reshape(P, 15, 2) for k, v in res.items()}
        return {k: ((half * KRONROD_W[None, :, None] * v).sum(1), (half * GAUSS7_W[None, :, None] * v).sum(1))
                for k, v in res.items()}

    def run(self, breaks=None, level=0, max_panels=600, panels=None, est=None):
        """Adapt panels starting from sorted breakpoints (NB, 2), or continue from panels (P, 2, 2) with their
        estimates; returns (panels, per-panel estimates)."""
        if panels is None:
            panels = torch.stack([breaks[:-1], breaks[1:]], 1)
            est = self.evaluate(panels, level)
        history = []
        for _ in range(60):
            err = self.quantities.errors(est)  # (P, 2)
            if self.shared:
                err = err.amax(1, keepdim=True).expand_as(err)
            total = err.sum(0)
            target = self.tol / 4
            if bool((total < target).all()) or panels.shape[0] >= max_panels:
                break
            history.append(float((total / target).max()))
            if len(history) > 4 and history[-1] > 0.5 * history[-5]:
                break  # stagnating: the inner integrals' noise floor; the refinement check reports the error
            order = err.argsort(0, descending=True)
            cum = err.gather(0, order).cumsum(0)
            need = int(((total[None] - cum) >= target / 2).sum(0).max()) + 1
            need = min(need, max(1, panels.shape[0] // 2), max_panels - panels.shape[0])
            pick = order[:need]  # (need, 2)
            mask = torch.zeros(panels.shape[0], 2, dtype=torch.bool)
            mask.scatter_(0, pick, True)
            # split the picked panels of each data point; keep the rest (same count per column)
            new_p, keep_p, keep_e = [], [], []
            for k in range(2):
                pk = panels[:, :, k]
                sel = pk[mask[:, k]]
                mid = sel.mean(1, keepdim=True)
                new_p.append(torch.cat([torch.cat([sel[:, :1], mid], 1), torch.cat([mid, sel[:, 1:]], 1)]))
                keep_p.append(pk[~mask[:, k]])
                keep_e.append({q: (K[~mask[:, k], k], G[~mask[:, k], k]) for q, (K, G) in est.items()})
            new_panels = torch.stack(new_p, -1)
            new_est = self.evaluate(new_panels, level)
            panels = torch.cat([torch.stack(keep_p, -1), new_panels])
            est = {q: tuple(torch.cat([torch.stack([keep_e[0][q][i], keep_e[1][q][i]], -1), new_est[q][i]])
                            for i in range(2)) for q in est}
        return panels, est


class Joined:
    """Outer integrations refined together (exact() with a flow guide: the expectations under q in the base noise,
    the evidence in u): panels are a tuple, one per outer, and their estimates are merged into one dict."""

    def __init__(self, *outers):
        self.outers = outers

    def evaluate(self, panels, level):
        est = {}
        for outer, p in zip(self.outers, panels):
            est.update(outer.evaluate(p, level))
        return est


def _split_all(panels):
    """Every panel (P, 2, 2) split at its midpoint: (2P, 2, 2); a tuple of panel sets: each one."""
    if isinstance(panels, tuple):
        return tuple(_split_all(p) for p in panels)
    mid = panels.mean(1, keepdim=True)
    return torch.cat([torch.cat([panels[:, :1], mid], 1), torch.cat([mid, panels[:, 1:]], 1)])


TAIL_LADDER = (1.0, 3.0, 9.0)  # breakpoints beyond a narrow draw set's extreme quantiles, in its robust sds


def initial_breaks(draws: list, lo, hi, extra=12, narrow: list = ()):
    """Sorted breakpoints (NB, 2) from quantiles of each (count, 2) draw set, plus a uniform set over [lo, hi].

    A draw set narrower than the uniform spacing (16 robust sds, half its 16-84% range each, within one uniform
    panel; e.g. a guide's scale of 1e-5 in a range of tens) also gets breakpoints beyond its 0.1% and 99.9%
    quantiles at TAIL_LADDER multiples of its robust sd, so that its outer 0.2% lies in panels of its own width,
    where Gauss-Kronrod sees it. Without them that mass sat at the end of a panel as wide as the uniform spacing,
    missed by the K15 and G7 nodes alike (so no error estimate flagged it): q(z|x_k) integrated to 0.998. Wider
    sets get none (their breakpoints, and numbers, are as before). The sets in `narrow` (e.g. each data point's
    own draws, where `draws` pools them) add their quantiles and tails only where they are narrow."""
    probs = torch.tensor([0.001, 0.02, 0.16, 0.5, 0.84, 0.98, 0.999], dtype=torch.float64)
    spacing = (hi - lo) / (extra - 1)
    ladder = torch.tensor(TAIL_LADDER, dtype=torch.float64)[:, None]
    breaks = []
    for d, always in [(d, True) for d in draws] + [(d, False) for d in narrow]:
        q = torch.quantile(d, probs, dim=0)
        sd = ((q[4] - q[2]) / 2).clamp_min(1e-12)
        is_narrow = bool((16 * sd < spacing).any())
        if always or is_narrow:
            breaks.append(q)
        if is_narrow:
            breaks += [q[0] - ladder * sd, q[-1] + ladder * sd]
    uni = torch.stack([torch.linspace(float(lo[k]), float(hi[k]), extra, dtype=torch.float64) for k in range(2)], -1)
    b = torch.cat(breaks + [uni])
    return torch.maximum(torch.minimum(b, hi), lo).sort(0).values


def _edge_panels(panels, est, quantities, margin=20.0, count=6):
    """Panels (M, 2, 2) that extend the range by half its width on each side where some integrand's density in the
    end panel is above exp(-margin) of its peak (for any data point); None when both ends are negligible."""
    width = panels[:, 1] - panels[:, 0]
    inf = torch.full_like(width, math.inf)
    i0 = torch.where(width > 0, panels[:, 0], inf).argmin(0, keepdim=True)
    i1 = torch.where(width > 0, panels[:, 1], -inf).argmax(0, keepdim=True)
    lo, hi = panels[:, 0].gather(0, i0)[0], panels[:, 1].gather(0, i1)[0]
    grow_lo = grow_hi = False
    for q in quantities:
        dens = est[q][0].abs() / width.clamp_min(1e-300)
        peak = dens.amax(0, keepdim=True) * math.exp(-margin)
        grow_lo |= bool((dens.gather(0, i0) > peak).any())
        grow_hi |= bool((dens.gather(0, i1) > peak).any())
    if not (grow_lo or grow_hi):
        return None
    span, out = (hi - lo) / 2, []
    t = torch.linspace(0, 1, count + 1, dtype=torch.float64)[:, None]
    for grow, start in ((grow_lo, lo - span), (grow_hi, hi)):
        if grow:
            edges = start + t * span
            out.append(torch.stack([edges[:-1], edges[1:]], 1))
    return torch.cat(out)


EXTENSIONS = 4  # how often adapt may double the range before it calls the integrands' tails too heavy


class HeavyTails(ValueError):
    """An integrand still above e^-20 of its peak at an end of the range after EXTENSIONS doublings: the range
    cuts off mass that the refinement (which splits panels, never widens the range) cannot see."""


def adapt(outer, breaks, quantities=None):
    """outer.run from breaks, extending the range (up to EXTENSIONS times) until the integrands (`quantities`;
    None: all of them) vanish at both ends; HeavyTails where they still do not (a Student-t or Cauchy guide: the
    tails of q(z)·z² decay as a power, and a truncated integral would be reported with an error that misses them)."""
    panels, est = outer.run(breaks)
    for _ in range(EXTENSIONS):
        extra = _edge_panels(panels, est, quantities or list(est))
        if extra is None:
            return panels, est
        more = outer.evaluate(extra, 0)
        panels = torch.cat([panels, extra])
        est = {k: tuple(torch.cat([a, b]) for a, b in zip(est[k], more[k])) for k in est}
        panels, est = outer.run(panels=panels, est=est)
    if _edge_panels(panels, est, quantities or list(est)) is not None:
        lo, hi = float(panels[:, 0].min()), float(panels[:, 1].max())
        raise HeavyTails(f"the integrands do not vanish at the ends of the quadrature's range [{lo:.3g}, {hi:.3g}] "
                         f"after {EXTENSIONS} doublings: the guide's tails are too heavy for the quadrature (a "
                         "power-law tail, as a Student-t's or a Cauchy's), so no exact value is computed")
    return panels, est


def _trim_tails(panels, est, shared: bool = False):
    """The panels (P, 2, 2) without the runs of end panels (per data point) where every quantity's Kronrod and
    Gauss estimates are below TAIL_NEGLIGIBLE of its total |integral| there: numerically zero tails, which the range
    extension (_edge_panels, margin e^-20) overshot. The data point with fewer panels is padded with zero-width
    panels (they contribute exactly 0). With `shared` (one grid for both points) a panel goes only where it is
    negligible for both."""
    rel = torch.stack([torch.maximum(K.abs(), G.abs()) / K.abs().sum(0).clamp_min(1e-300)
                       for K, G in est.values()]).amax(0)  # (P, 2)
    small = rel < TAIL_NEGLIGIBLE
    if shared:
        small = small.all(1, keepdim=True).expand_as(small)
    kept = []
    for k in range(2):
        order = panels[:, 0, k].argsort()
        keep = (~small[order, k]).nonzero().squeeze(-1)
        if keep.numel() == 0:
            return panels
        kept.append(panels[order[int(keep[0]):int(keep[-1]) + 1], :, k])
    count = max(len(p) for p in kept)
    for k, p in enumerate(kept):
        mid = p[len(p) // 2].mean()
        kept[k] = torch.cat([p, mid.expand(count - len(p), 2)])
    return torch.stack(kept, -1)


def refine(outer, panels, result, summarise, numbers, tol, est=None) -> tuple:
    """Split every panel in two and raise the level (the inner integrals then cut each seeded panel in 2**level and
    tighten their tolerance tenfold per level), up to 3 times, until the reported numbers
    change by less than tol: (panels, estimates, result, error = the last change). Given the panels' estimates
    `est`, numerically zero end panels are dropped first (_trim_tails)."""
    level, error = 0, math.inf
    for _ in range(3):
        if est is not None and not isinstance(panels, tuple):
            panels = _trim_tails(panels, est, getattr(outer, "shared", False))
        fine_panels = _split_all(panels)
        fine = outer.evaluate(fine_panels, level + 1)
        fine_result = summarise(fine)
        error = max(abs(a - b) for a, b in zip(numbers(result), numbers(fine_result)))
        panels, est, result, level = fine_panels, fine, fine_result, level + 1
        if error < tol:
            break
    return panels, est, result, error
