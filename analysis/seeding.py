"""Where the inner integral starts: breakpoints in v laid around the features of q(u, v|x) and p(x, u, v).

Per u node and data point (a row), the local maxima of each log-density on a dense grid in v (LOCATE_POINTS), the
under-resolved needles between its points and a peak beyond its ends (extrapolated by a parabola) are zoomed in on,
their widths measured on each side (a geometric ladder, the first offset where the density drops by 1 nat), and
breakpoints set at LADDER multiples of the widths plus a uniform background (BACKGROUND). A feature whose Laplace mass
is MASS_WINDOW nats below its density's best, or that repeats a kept one, is dropped. The panels between the
breakpoints are where analysis.inner.Inner starts its adaptive splitting; a missed feature costs only splits there.
"""
import math

import torch

from .densities import Densities

LADDER = (0.0, 1.5, 3.5, 6.5, 12.0)  # breakpoints at m +- c * width
LOCATE_POINTS = 2049  # dense grid that finds the features of the inner integrand
SPLIT_LOCATE_POINTS = 257  # the same for the two coordinates of one site (the VAE at latent_dim=2): no conditional
#                            prior there makes a needle atop a broad density, and every grid point runs the decoder
BEYOND_STENCIL = 64  # cells between the grid points that extrapolate a peak beyond the grid's end
CANDIDATES = 2  # features kept per density (q, p) per row
BACKGROUND = 12  # uniform inner breakpoints that cover what no feature claims
LADDER_STEPS = 16  # offsets of the width ladder per side: from 1/8 of the zoom's half-width up by 2**15
RESOLUTION = 4  # ulps, relative: the zoom stops at brackets the model's inputs (Densities.dtype) cannot resolve
ZOOM_SHRINK = 64.0  # the most the feature zoom's bracket shrinks in one step (4 where no parabola fits)
MASS_WINDOW = 40.0  # features with Laplace mass below the best by more than this many nats are dropped


class FeatureSeeding:
    """The densities of an inner integral over v at rows of u (A, 2) and the panels seeded at their features; the
    base of analysis.inner.Inner. `parts` selects the densities read: q, p or both."""

    def __init__(self, dens: Densities, outer: str, inner: str, lo: float, hi: float, parts=("q", "p")):
        self.d, self.outer, self.inner, self.lo, self.hi, self.parts = dens, outer, inner, lo, hi, parts

    def _eval(self, u, v):
        """Site log-densities at u (A, 2) against v (A, B, 2) or (1, B, 2), chunked over rows: dict of (A, B, 2)."""
        rows = self.d.rows(2 * v.shape[1])
        pieces = []
        for s in range(0, u.shape[0], rows):
            vs = v[s:s + rows] if v.shape[0] > 1 else v
            pieces.append(self.d.logs({self.outer: u[s:s + rows, None, :], self.inner: vs}, self.parts))
        sizes = [min(rows, u.shape[0] - s) for s in range(0, u.shape[0], rows)]
        if len(pieces) == 1:  # one evaluation: broadcast views, no copies
            return {k: t.expand(sizes[0], v.shape[1], 2) for k, t in pieces[0].items()}
        return {k: torch.cat([p[k].expand(n, v.shape[1], 2) for p, n in zip(pieces, sizes)]) for k in pieces[0]}

    def _joint(self, logs):
        """{J: log joint} for J in the parts: log q(u, v|x) and log p(x, u, v)."""
        return {J: sum(val for key, val in logs.items() if key.startswith(J + ":")) for J in self.parts}

    def _candidates(self, u):
        """Starting points (A, 2, F) of the features and the density (q or p) each belongs to, from a dense grid:
        per density the CANDIDATES highest local maxima, and the most under-resolved local maxima (a needle between
        grid points shows far below its height, with a steep drop to a neighbour: a peak of width w drops about
        h^2 / 2w^2, so a drop above 0.5 nats means narrower than a cell), and a peak beyond an end of the grid where
        the density still rises there (_beyond). Returns (centres, kinds, cell)."""
        points = LOCATE_POINTS if self.d.coords.split is None else SPLIT_LOCATE_POINTS
        grid = torch.linspace(self.lo, self.hi, points, dtype=torch.float64)
        ell = self._joint(self._eval(u, grid[None, :, None].expand(1, -1, 2)))
        centres, kinds = [], []
        for J in self.parts:
            e = torch.nan_to_num(ell[J].transpose(1, 2).contiguous(), nan=-math.inf)  # (A, 2, L)
            pooled = torch.nn.functional.max_pool1d(e.view(-1, 1, e.shape[-1]), 7, 1, 3).view(e.shape)
            maxima = torch.where(e >= pooled, e, -math.inf).topk(CANDIDATES, dim=-1)
            # a row with fewer finite local maxima than CANDIDATES repeats its highest one (dropped as a repeat below)
            idx = torch.where(torch.isfinite(maxima.values), maxima.indices, maxima.indices[..., :1])
            step = e[..., 1:] - e[..., :-1]
            edge = torch.full_like(e[..., :1], math.inf)
            rise, fall = torch.cat([edge, step], -1), torch.cat([-step, edge], -1)  # e - left, e - right neighbour
            deficit = torch.maximum(rise, fall).nan_to_num(0.0, posinf=1e300)
            peak = (torch.minimum(rise, fall) >= 0) & (deficit > 0.5) & torch.isfinite(e)
            sharp = torch.where(peak, deficit, 0.0).topk(CANDIDATES, dim=-1)
            used = sharp.values.gt(0).flatten(0, 1).any(0)  # sharp slots that some row needs
            idx_sharp = torch.where(sharp.values > 0, sharp.indices, idx[..., :1])[..., used]
            both = torch.cat([idx, idx_sharp], -1)
            centres.append(grid[both])
            kinds += [J] * both.shape[-1]
            beyond = self._beyond(e, grid)
            if bool(torch.isfinite(beyond).any()):  # a slot only where some row needs it
                centres.append(torch.where(torch.isfinite(beyond), beyond, grid[idx[..., 0]])[..., None])
                kinds.append(J)
        return torch.cat(centres, -1), kinds, float(grid[1] - grid[0])

    def _beyond(self, e, grid):
        """Where a log-density e (A, 2, L) on the grid still rises at an end of it, concave there, its peak lies
        beyond the located range (e.g. the needle q(z2|z1) of a structured guide far out in z1): the vertex of the
        parabola through the end point and the points BEYOND_STENCIL and 2 BEYOND_STENCIL cells inwards, at most one
        span beyond (the panels reach that far); nan elsewhere. Exact for a log-density quadratic in v (a Gaussian),
        whatever its width; the wide stencil keeps the float32 rounding of the model's inputs out of the curvature."""
        m = BEYOND_STENCIL
        step, span = m * float(grid[1] - grid[0]), self.hi - self.lo
        out = torch.full(e.shape[:-1], math.nan, dtype=torch.float64)
        ends = ((float(grid[0]), (0, m, 2 * m), -1.0), (float(grid[-1]), (-1, -1 - m, -1 - 2 * m), 1.0))
        for end, inward, sign in ends:
            e0, e1, e2 = (e[..., i] for i in inward)  # the end point and two inwards
            curv = (e0 - 2 * e1 + e2) / 2  # f(t) = e0 + slope t + curv t^2, t in stencil steps inwards from the end
            slope = e1 - e0 - curv
            rising = (e[..., inward[0]] > e[..., inward[0] + (1 if sign < 0 else -1)]) & (curv < 0) & (slope < 0)
            rising &= torch.isfinite(e0 + e1 + e2)
            reach = (slope / (2 * curv)).clamp(max=span / step) * step  # how far beyond the end the vertex lies
            out = torch.where(rising, end + sign * reach, out)
        return out

    def _values(self, u, points, kinds, repeat=None):
        """Each feature's own log-density (q or p) at points (A, 2, F, S): a tensor of that shape. With `repeat`
        (A, 2, F), the features that repeat another in every row and data point are not evaluated: -inf there."""
        A, _, F, S = points.shape
        cols = list(range(F)) if repeat is None else (~repeat.flatten(0, 1).all(0)).nonzero().squeeze(-1).tolist()
        G = len(cols)
        lj = self._joint(self._eval(u, points[:, :, cols].permute(0, 2, 3, 1).reshape(A, G * S, 2)))
        lj = {J: v.reshape(A, G, S, 2).permute(0, 3, 1, 2) for J, v in lj.items()}
        out = torch.full((A, 2, F, S), -math.inf, dtype=torch.float64)
        for g, f in enumerate(cols):
            out[:, :, f] = lj[kinds[f]][:, :, g]
        return torch.nan_to_num(out, nan=-math.inf)

    def features(self, u):
        """Panels (a, b), each (A, 2, P), between breakpoints laid around the modes of q(u, .) and p(x, u, .) in v,
        at multiples (LADDER) of each mode's width on either side, plus a uniform background, for rows u (A, 2)."""
        A = u.shape[0]
        c, kinds, h = self._candidates(u)
        F = c.shape[-1]
        # zoom: 9 points over the bracket, keep the best, shrink by 4, until the bracket is flat to 0.05 nats. Where
        # the best point is interior and the log-density is concave there, the parabola through it and its two
        # neighbours gives the peak (its vertex: the new centre) and its width sigma (from the curvature): the
        # bracket then shrinks to sigma / 4 (flat to about 0.03 nats for a Gaussian peak), by at most ZOOM_SHRINK
        half = torch.full_like(c, h)
        best = torch.full_like(c, -math.inf)
        steps = torch.linspace(-1, 1, 9, dtype=torch.float64)
        rows = torch.arange(A)
        # a candidate that repeats an earlier one of its density (same start) is not zoomed: it copies the result
        first = torch.arange(F).expand(c.shape).clone()
        for j in range(F):
            for i in range(j - 1, -1, -1):
                if kinds[i] == kinds[j]:
                    first[..., j] = torch.where(c[..., i] == c[..., j], first[..., i], first[..., j])
        repeat = first != torch.arange(F)
        resolution = RESOLUTION * torch.finfo(self.d.dtype).eps  # float32 inputs: 4 * 2**-23
        for _ in range(24):
            pts = c[rows, ..., None] + half[rows, ..., None] * steps
            val = self._values(u[rows], pts, kinds, repeat[rows])  # a repeat copies its first's result below
            arg = val.argmax(-1, keepdim=True)
            top = val.gather(-1, arg).squeeze(-1)
            best[rows] = top
            at = pts.gather(-1, arg).squeeze(-1)
            busy = ~(top - val.amin(-1) < 0.05) & torch.isfinite(top) & ~repeat[rows]
            busy &= half[rows] > resolution * at.abs().clamp_min(1.0)  # finer than the inputs resolve: stop
            left = val.gather(-1, (arg - 1).clamp(min=0)).squeeze(-1)
            right = val.gather(-1, (arg + 1).clamp(max=8)).squeeze(-1)
            curv = left - 2 * top + right  # second difference at the best point (< 0: a concave peak)
            arg = arg.squeeze(-1)
            peak = (arg > 0) & (arg < 8) & (curv < 0) & torch.isfinite(curv)
            # trusted only where the parabola also predicts the points two steps out (where they exist) to 5% of
            # their drop: the log-density is quadratic over the bracket
            for k in (-2, 2):
                far = val.gather(-1, (arg + k).clamp(0, 8)[..., None]).squeeze(-1)
                guess = top + (k / 2) * (right - left) + 2 * curv
                inside = (arg + k >= 0) & (arg + k <= 8)
                peak &= ~inside | ((guess - far).abs() <= 0.05 * (top - far) + 0.05)
            spacing = half[rows] / 4
            curv = torch.where(peak, curv, -torch.ones_like(curv))
            vertex = at + spacing * (left - right).nan_to_num(0.0) / (2 * curv)
            sigma = spacing / (-curv).sqrt()
            c[rows] = torch.where(peak, vertex, at)
            quarter = half[rows] / 4
            fast = torch.minimum(torch.maximum(sigma / 4, half[rows] / ZOOM_SHRINK), quarter)
            shrunk = torch.where(peak, fast, quarter)
            half[rows] = torch.where(busy, shrunk, half[rows])
            rows = rows[busy.flatten(1).any(1)]
            if rows.numel() == 0:
                break
        c, half, best = (t.gather(-1, first) for t in (c, half, best))
        # widths: on each side, the first offset of a geometric ladder (factor 2) where the density drops by 1 nat;
        # the ladder starts at an eighth of the zoom's last half-width (the density is flat to 0.05 nats within it)
        # and runs up to 2**15 times that or the span (no drop within: its last offset)
        span = self.hi - self.lo
        deltas = ((half / 8)[..., None] * 2.0 ** torch.arange(LADDER_STEPS, dtype=torch.float64)).clamp(max=span)
        val = self._values(u, c[..., None] + torch.cat([-deltas, deltas], -1), kinds, repeat)
        val = val.gather(2, first[..., None].expand_as(val))  # a repeat's points are its first's
        top = torch.maximum(best, val.amax(-1))
        drop = top[..., None] - val >= 1.0
        D = LADDER_STEPS
        wl, wr = [torch.where(d.any(-1), deltas.gather(-1, d.float().argmax(-1, keepdim=True)).squeeze(-1),
                              deltas[..., -1]) / math.sqrt(2) for d in (drop[..., :D], drop[..., D:])]
        mass = top + torch.log(wl + wr)
        keep = torch.zeros_like(mass, dtype=torch.bool)
        for J in self.parts:
            sl = torch.tensor([k == J for k in kinds])
            m = mass[..., sl]
            keep[..., sl] = torch.isfinite(m) & (m >= m.amax(-1, keepdim=True) - MASS_WINDOW)
        # drop a feature that repeats a kept one (same mode within a quarter width, width within a factor 2)
        wmin = torch.minimum(wl, wr)
        for j in range(F):
            for i in range(j):
                same = ((c[..., i] - c[..., j]).abs() < 0.25 * torch.minimum(wmin[..., i], wmin[..., j])) & \
                    ((wl[..., i] + wr[..., i]) / (wl[..., j] + wr[..., j])).log().abs().lt(math.log(2)) & keep[..., i]
                keep[..., j] &= ~same
        ladder = torch.tensor(LADDER, dtype=torch.float64)
        bp = torch.cat([c[..., None] - wl[..., None] * ladder, c[..., None] + wr[..., None] * ladder[1:]], -1)
        bp = torch.where(keep[..., None], bp, torch.full_like(bp, self.lo)).reshape(A, 2, -1)
        bg = torch.linspace(self.lo, self.hi, BACKGROUND + 1, dtype=torch.float64).expand(A, 2, -1)
        # a wide feature may reach beyond the located range (rows far out in u): follow it up to one span
        bp = torch.cat([bp.clamp(self.lo - span, self.hi + span), bg], -1).sort(-1).values
        # panels between consecutive breakpoints; drop the empty ones (as many per row as the fullest row keeps)
        a, b = bp[..., :-1], bp[..., 1:]
        empty = (b - a <= 0).to(torch.uint8)
        order = empty.sort(dim=-1, stable=True).indices[..., :int((1 - empty).sum(-1).max())]
        return a.gather(-1, order), b.gather(-1, order)
