"""Exact evaluation by deterministic quadrature for models with at most two scalar latents (VAE d=1, DLGM 2x1).

Public: exact() (loss terms, log p(x_k), NLL, gap), surgery() (ELBO surgery of the top latent), evidence() (log p(x_k)
of the model alone) and posterior_grid() (prior, q, aggregate q and true posterior marginals on regular grids, for
plots). Each refuses bad input before any work, in one line (ValueError naming the problem; _check): tol or points
out of range, data that are not OneBit, a model or guide built for another n, a guide whose sites, shapes, plates,
support or density do not fit the model (infer.fit.check_inputs, as analysis.report.evaluate).

Every density comes from tracing the model and the guide under `poutine.condition` on grids of latent values, so
any guide that samples the model's latent sites works. Names: u is the model's bottom latent (the parent of x: z
of the VAE, z1 of the DLGM) and v the other one (z2). Integrals run over u outside and v inside:

* outside, globally adaptive Gauss-Kronrod (7, 15) panels in u, split where the G7/K15 difference is largest, and
  extended until the integrands vanish at both ends;
* inside, per u node and data point, Gauss-Kronrod panels in v seeded around the features of q(u, v|x) and
  p(x, u, v) as functions of v (local maxima found on a dense grid, zoomed in on, widths measured on each side;
  breakpoints at multiples of the widths plus a uniform background), then split adaptively where the G7/K15
  difference is largest. A steep prior map z2 -> z1 makes p(z1|z2) a needle in z2; the seeding finds it. A density
  still rising at an end of the dense grid peaks beyond it (far out in u, a structured guide's needle q(z2|z1) can
  sit outside the z2 range of the draws): its peak is extrapolated by a parabola and seeded too. Each row's
  integrands are exp(log-density - shift) with a per-row shift; a split that finds a peak far above it raises the
  shift and rescales the row's earlier estimates, so exp never overflows.

When the guide samples u from a flow (a TransformedDistribution: u = T(eps), eps from its base distribution), the
expectations under q run over eps instead (qdensity.BaseNoise: forward map and log-Jacobian only): q(u) du =
base(eps) d eps is smooth in eps, while as a function of u a spline's steep bins make spikes narrower than any u
grid. The evidence p(x, u) is integrated in u, where it is smooth.

Densities are float64 where it matters: the model's Bernoulli likelihood and the Normal sites are evaluated from
float64 parameters (qdensity.log_prob64; float32 cancels a 0-bit's log-probability to 0 for logits <= -15). Model
evaluations are chunked so that no per-bit tensor exceeds MAX_ELEMENTS elements, whatever n.

Everything is summed in log space with per-row shifts. Accuracy is proven by refinement: the result is recomputed
with every u panel split in two (end panels where every integrand is below 1e-30 of its total are dropped first)
and a 10x tighter inner tolerance, and the largest change among the reported numbers
is the error (repeated, up to 3 times, until it is below tol); every reported number counts, per data point as
well. The refined numbers are returned. tests/test_quadrature_accuracy.py checks the error against an independent
float64 evaluation of trained runs at n = 1000.
"""
import math

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from infer.runtime import flush_denormals

from .qdensity import BaseNoise, GuideDensity, log_prob64

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

LADDER = (0.0, 1.5, 3.5, 6.5, 12.0)  # breakpoints at m +- c * width
LOCATE_POINTS = 2049  # dense grid that finds the features of the inner integrand
BEYOND_STENCIL = 64  # cells between the grid points that extrapolate a peak beyond the grid's end
CANDIDATES = 2  # features kept per density (q, p) per row
INNER_TOL = 1e-4  # relative error target of each inner integral (times 10**-level)
BACKGROUND = 12  # uniform inner breakpoints that cover what no feature claims
LADDER_STEPS = 16  # offsets of the width ladder per side: from 1/8 of the zoom's half-width up by 2**15
RESOLUTION = 4 * 2.0 ** -23  # relative: the zoom stops at brackets the float32 model inputs cannot resolve
ZOOM_SHRINK = 64.0  # the most the feature zoom's bracket shrinks in one step (4 where no parabola fits)
RESHIFT = 300.0  # nats: a split panel's peak this far above its row's shift raises the shift (exp overflows at 709)
TAIL_NEGLIGIBLE = 1e-30  # end panels whose every integral is below this fraction of its total are not refined
MASS_TOLERANCE = 1e-3  # q(.|x_k) must integrate to 1 within this on a grid, or exact() and surgery() refuse it
STALL_ROUNDS = 3  # inner rounds without the error halving after which a row stops splitting
MASS_WINDOW = 40.0  # features with Laplace mass below the best by more than this many nats are dropped
CHUNK = 400_000  # latent points per model/guide evaluation (at most; fewer where the data are wide, see rows())
MAX_ELEMENTS = 2 ** 24  # elements of the largest per-bit tensor of one model evaluation (latent values x N x n):
#                          memory is bounded for any n (a float64 tensor of this size is 128 MiB)


def _check(model, guide, data, **values) -> None:
    """The checks of every public function here, before any work, each a one-line ValueError naming the problem:
    the arguments `values` (infer.validate: tol a finite number > 0, points an integer >= 2), then data, model and
    guide (infer.fit.check_inputs: the data's n, the guide's sites, shapes, plates, support and density)."""
    from infer.fit import check_inputs
    from infer.validate import check

    for name, value in values.items():
        check(name, value)
    check_inputs(model, guide, data)


def _lse(t, dim):
    """logsumexp that returns -inf (not nan) for all -inf slices."""
    m = t.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (t - m).exp().sum(dim).log() + m.squeeze(dim)


class Densities:
    """Site log-densities of a model and guide on grids of latent values, read through poutine.condition/trace."""

    def __init__(self, model, guide, data, need_q: bool = True):
        self.model, self.guide, self.data, self.x = model, guide, data, data.x
        with torch.no_grad(), torch.random.fork_rng(), poutine.block():
            mt = poutine.trace(model).get_trace(self.x)

        def sample_sites(tr, observed):
            return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
                    and bool(s["is_observed"]) == observed]

        self.latents, self.observed = sample_sites(mt, False), sample_sites(mt, True)
        # raises ValueError for a guide whose density cannot be read; need_q=False: only the guide's draws are used
        self.q = GuideDensity(model, guide, self.x) if need_q else None
        points = self.x.shape[-2]
        sizes = {n: mt.nodes[n]["value"].numel() // points for n in self.latents}
        if sum(sizes.values()) > 2 or any(s != 1 for s in sizes.values()):
            raise ValueError(f"exact quadrature handles at most 2 scalar latents, one per site; this model has "
                             f"{', '.join(f'{n}: {s}' for n, s in sizes.items())} scalars per data point; "
                             "use analysis.iwae.iwae instead")
        self.joint = need_q and self.q.kind == "joint"
        if self.joint and len(self.latents) > 1:
            raise ValueError(f"the guide ({type(guide).__name__}) is one joint density over {len(self.latents)} "
                             f"latents x {points} data points; q({', '.join(self.latents)}|x_k) is its marginal, an "
                             f"integral over the other point's {len(self.latents)} latents at every node, so the "
                             f"quadrature would be {len(self.latents) * points}-D")
        self.bottom = self.latents[-1]  # the parent of x (z, z1)
        self.top = self.latents[0]  # the latent whose prior has no parents (z, z2)
        self.other = self.latents[0] if len(self.latents) == 2 else None
        self.w = data.w.double()
        if self.joint and not bool(torch.allclose(self.w, self.w.mean())):
            raise ValueError("a joint guide couples the data points: its loss is defined for equal data weights only")
        self.marginal = None
        # elements of the observed sites for one value of the latents per data point (N x n for the one-bit data):
        # the width of the model's per-bit tensors, which bounds how many latent values one evaluation may hold
        self.width = max(1, sum(mt.nodes[n]["value"].numel() for n in self.observed))
        self.base = None  # the bottom site's base noise, when the guide samples it from a flow (see qdensity)
        if need_q and self.q.kind == "direct":
            with torch.no_grad(), torch.random.fork_rng(), poutine.block():
                gt = poutine.trace(guide).get_trace(self.x)
            self.base = BaseNoise.of(gt, self.bottom, self.latents)

    def rows(self, per_row: int = 2) -> int:
        """How many rows of latent values (one per data point for the parent of x, with per_row latent points in all)
        one model evaluation may take: at most CHUNK latent points, and at most MAX_ELEMENTS elements in the per-bit
        tensors (rows x width)."""
        return max(1, min(CHUNK // per_row, MAX_ELEMENTS // self.width))

    def logs(self, values: dict, parts=("q", "p")) -> dict:
        """{'q:site' | 'p:site': float64 log-density} for every guide/model site at the given latent values.

        values maps site -> float64 tensor (..., 2) (last dim = data point); shapes broadcast."""
        vals = {k: v.float().unsqueeze(-1) for k, v in values.items()}
        out = {}
        with torch.no_grad(), poutine.block():
            if "q" in parts and self.joint:
                out["q:" + self.bottom] = self._marginal()(values[self.bottom])
            elif "q" in parts:
                out.update({"q:" + n: v for n, v in self.q.log_prob(vals).items()})
            if "p" in parts:
                tr = poutine.trace(poutine.condition(self.model, data=vals)).get_trace(self.x)
                for n in self.latents + self.observed:
                    out["p:" + n] = log_prob64(tr.nodes[n])
        return out

    def _marginal(self) -> "JointMarginal":
        if self.marginal is None:
            self.marginal = JointMarginal(self.q, self.bottom, self.samples()["q:" + self.bottom])
        return self.marginal

    def samples(self, count: int = 4096, seed: int = 0) -> dict:
        """Draws of every latent from the guide ('q:site', shape (count, 2)) and the model prior ('p:site'), plus the
        log-likelihood of each prior draw ('p:loglik'); fixed seed, so results are deterministic."""
        out = {}
        step = self.rows(2)  # model draws per evaluation (all of them unless the data are wide)
        with torch.no_grad(), torch.random.fork_rng(), poutine.block():
            torch.manual_seed(seed)
            with pyro.plate("_exact_particles", count, dim=-2):
                gt = poutine.trace(self.guide).get_trace(self.x)
            prior, loglik = {n: [] for n in self.latents}, []
            for start in range(0, count, step):
                with pyro.plate("_exact_particles", min(step, count - start), dim=-2):
                    mt = poutine.trace(self.model).get_trace(self.x)
                for n in self.latents:
                    value = mt.nodes[n]["value"].detach()
                    prior[n].append(value.reshape(value.shape[0], -1))
                loglik.append(sum(mt.nodes[n]["fn"].log_prob(mt.nodes[n]["value"]).double() for n in self.observed))
        for n in self.latents:
            out["q:" + n] = gt.nodes[n]["value"].detach().reshape(count, 2).double()  # AutoDelta's is a param
            out["p:" + n] = torch.cat(prior[n]).reshape(count, -1).double().expand(count, 2)
        out["p:loglik"] = torch.cat(loglik)
        return out


def sample_range(draws: torch.Tensor, pad: float = 10.0) -> tuple:
    """(lo, hi) covering draws (count, ...) beyond their 0.1% / 99.9% quantiles by `pad` robust standard deviations."""
    d = draws.reshape(-1)
    d = d[torch.isfinite(d)]
    q = torch.quantile(d, torch.tensor([0.001, 0.16, 0.84, 0.999], dtype=d.dtype))
    s = max(float(q[2] - q[1]) / 2, 1e-3)
    return float(q[0]) - pad * s, float(q[3]) + pad * s


def _gauss_legendre(m: int):
    """Gauss-Legendre nodes and weights on [-1, 1], float64 tensors."""
    x, w = np.polynomial.legendre.leggauss(m)
    return torch.tensor(x), torch.tensor(w)


MARGINAL_PANELS = 128  # Gauss-Kronrod panels per point for the marginals of a joint guide


class JointMarginal:
    """The marginals q(z|x_k) = integral of q(z_0, z_1) over the other point's z, and the joint entropy, of a joint
    guide (one density over both data points, e.g. AutoIAFNormal) with one scalar latent per point: Gauss-Kronrod 15
    on MARGINAL_PANELS uniform panels over each point's range (10 robust standard deviations beyond its draws)."""

    def __init__(self, density: GuideDensity, site: str, draws: torch.Tensor):
        if draws.shape[1] != 2:
            raise ValueError(f"joint-guide marginals are implemented for 2 data points, got {draws.shape[1]}")
        self.q, self.site = density, site
        self.nodes, self.logw = [], []  # per point: nodes (M,), log weights (2, M): Kronrod, Gauss
        for k in range(2):
            lo, hi = sample_range(draws[:, k])
            edges = torch.linspace(lo, hi, MARGINAL_PANELS + 1, dtype=torch.float64)
            half = (edges[1:] - edges[:-1])[:, None] / 2
            self.nodes.append(((edges[1:] + edges[:-1])[:, None] / 2 + half * KRONROD_X).reshape(-1))
            self.logw.append(torch.stack([(half * KRONROD_W).reshape(-1).log(), (half * GAUSS7_W).reshape(-1).log()]))

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z_0, z_1) at z (..., 2), float64 (...)."""
        flat = z.reshape(-1, 2)
        out = [self.q.log_joint({self.site: c.float()[..., None]}).double() for c in flat.split(CHUNK)]
        return torch.cat(out).reshape(z.shape[:-1])

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """log q(z_k = v_k|x) for v (..., 2): a float64 tensor (..., 2)."""
        flat, out = v.reshape(-1, 2), []
        for k in range(2):
            b = self.nodes[1 - k]
            z = torch.empty(flat.shape[0], len(b), 2, dtype=torch.float64)
            z[..., k], z[..., 1 - k] = flat[:, k:k + 1], b
            out.append(_lse(self.log_joint(z) + self.logw[1 - k][0], -1))
        return torch.stack(out, -1).reshape(v.shape)

    def check(self) -> dict:
        """On the tensor product of the two points' rules: 'entropy' H[q(z_0, z_1)] and its K15 - G7 difference
        'entropy_error'; 'mass' (should be 1: a deficit means q reaches beyond the ranges); 'marginal_error', the
        q-weighted mean |log K15 - log G7| of each marginal (the larger of the two), i.e. the relative error of the
        marginal densities where they matter."""
        a, b = self.nodes
        lj = self.log_joint(torch.stack(torch.meshgrid(a, b, indexing="ij"), -1))  # (Ma, Mb)
        entropy = []
        for i in range(2):
            f = (lj + self.logw[0][i][:, None] + self.logw[1][i][None, :]).exp()
            entropy.append(-float(torch.where(f > 0, f * lj, torch.zeros_like(f)).sum()))
        marginal_error = 0.0
        for k, rows in ((0, lj), (1, lj.T)):  # rows: this point's nodes x the other point's nodes
            K, G = (_lse(rows + self.logw[1 - k][i], -1) for i in range(2))
            weight = (K + self.logw[k][0]).exp()
            marginal_error = max(marginal_error, float((weight * (K - G).abs().nan_to_num(0.0)).sum()))
        mass = float((lj + self.logw[0][0][:, None] + self.logw[1][0][None, :]).exp().sum())
        return {"entropy": entropy[0], "entropy_error": abs(entropy[0] - entropy[1]), "mass": mass,
                "marginal_error": marginal_error}


class Inner:
    """The inner integral over v at given u values (one per row and data point), by adaptive Gauss-Kronrod panels
    seeded at the features of the integrands; `parts` selects the densities integrated: q, p or both."""

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
        grid = torch.linspace(self.lo, self.hi, LOCATE_POINTS, dtype=torch.float64)
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

    def _values(self, u, points, kinds):
        """Each feature's own log-density (q or p) at points (A, 2, F, S): a tensor of that shape."""
        A, _, F, S = points.shape
        lj = self._joint(self._eval(u, points.permute(0, 2, 3, 1).reshape(A, F * S, 2)))
        lj = {J: v.reshape(A, F, S, 2).permute(0, 3, 1, 2) for J, v in lj.items()}
        out = torch.stack([lj[J][:, :, f] for f, J in enumerate(kinds)], 2)
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
        for _ in range(24):
            pts = c[rows, ..., None] + half[rows, ..., None] * steps
            val = self._values(u[rows], pts, kinds)
            arg = val.argmax(-1, keepdim=True)
            top = val.gather(-1, arg).squeeze(-1)
            best[rows] = top
            at = pts.gather(-1, arg).squeeze(-1)
            busy = ~(top - val.amin(-1) < 0.05) & torch.isfinite(top) & ~repeat[rows]
            busy &= half[rows] > RESOLUTION * at.abs().clamp_min(1.0)  # finer than the float32 inputs resolve: stop
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
        val = self._values(u, c[..., None] + torch.cat([-deltas, deltas], -1), kinds)
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

    def __call__(self, u, level: int = 0, rows: int = 256) -> dict:
        """For rows u (A, 2): 'lq' = log of the integral of q(u, v|x) over v, 'lp' = log of that of p(x, u, v),
        'mean' = {site key: E_q(v|u)[log-density]} (the conditional means under the guide) and 'at' = each site's
        log-density at one v node (for terms that do not depend on v). Rows are processed in blocks."""
        parts = [self._block(u[s:s + rows], level) for s in range(0, u.shape[0], rows)]

        def cat(key):
            return torch.cat([p[key] for p in parts])

        out = {k: cat(k) for k in parts[0] if k not in ("mean", "at")}
        for k in ("mean", "at"):
            out[k] = {name: torch.cat([p[k][name] for p in parts]) for name in parts[0][k]}
        return out

    def _panels(self, u, a, b):
        """Kronrod and Gauss estimates, per panel (A, 2, P), of the q mass, of q times each site log-density and
        of the p mass, relative to the per-row shifts self.shift (set at the first call; raised where these panels
        peak more than RESHIFT nats above it, and _block then rescales the row's earlier estimates)."""
        A, _, P = a.shape
        half = (b - a) / 2
        nodes = (a + b)[..., None] / 2 + half[..., None] * KRONROD_X  # (A, 2, P, 15)
        logs = self._eval(u, nodes.permute(0, 2, 3, 1).reshape(A, P * 15, 2))
        logs = {k: v.reshape(A, P, 15, 2).permute(0, 3, 1, 2) for k, v in logs.items()}
        joint = self._joint(logs)
        if self.shift is None:
            self.shift = {J: joint[J].amax((2, 3)).nan_to_num(0.0, neginf=0.0) for J in joint}
            self.at = {k: v[:, :, 0, 7] for k, v in logs.items()}
        else:  # a split found a peak far above the first panels' (exp would overflow): raise that row's shift
            peaks = {J: joint[J].amax((2, 3)) for J in joint}
            self.shift = {J: torch.where(peaks[J].nan_to_num(-math.inf) > self.shift[J] + RESHIFT, peaks[J],
                                         self.shift[J]) for J in joint}
        f = {}
        for J, val in joint.items():
            f[J] = torch.nan_to_num((val - self.shift[J][..., None, None]).exp())
        if "q" in f:
            for k, val in logs.items():
                f["qh:" + k] = torch.where(f["q"] > 0, f["q"] * val, torch.zeros_like(val))
        return {k: ((half[..., None] * KRONROD_W * v).sum(-1), (half[..., None] * GAUSS7_W * v).sum(-1))
                for k, v in f.items()}

    def _row_errors(self, est):
        """Per panel (A, 2, P), the largest |K15 - G7| among the row's integrals, relative to the row's size."""
        errs = []
        if "q" in est:
            zq = est["q"][0].sum(-1, keepdim=True).clamp_min(1e-300)
            errs.append((est["q"][0] - est["q"][1]).abs() / zq)
            for k, (K, G) in est.items():
                if k.startswith("qh:"):
                    scale = zq * (K.sum(-1, keepdim=True) / zq).abs().clamp_min(1.0)
                    errs.append((K - G).abs() / scale)
        if "p" in est:
            errs.append((est["p"][0] - est["p"][1]).abs() / est["p"][0].sum(-1, keepdim=True).clamp_min(1e-300))
        return torch.stack(errs).amax(0)

    def _block(self, u, level, splits=8, rounds=16):
        """Adaptive inner integration for one block of rows: start from the feature panels, then, for up to `rounds`,
        split the worst panels (as many as the neediest row needs, at most `splits`) of every row whose relative error
        sum exceeds INNER_TOL * 10**-level, until it does not or its error stalls (STALL_ROUNDS: the float32 noise
        floor of the model's outputs; the refinement check in _refine measures what is left)."""
        tol = INNER_TOL * 10.0 ** (-level)
        a, b = self.features(u)
        self.shift = None
        est = self._panels(u, a, b)
        history = []  # per round, each row's error relative to tol (the worse data point)
        for _ in range(rounds):
            err = self._row_errors(est)
            err = torch.where(b - a > 1e-12 * (self.hi - self.lo), err, torch.zeros_like(err))
            ratio = (err.sum(-1) / tol).amax(-1)
            history.append(ratio)
            busy = ratio > 1  # rows (A,)
            if len(history) > STALL_ROUNDS:  # a row whose error has not halved in STALL_ROUNDS rounds of splits sits
                #                              on its noise floor (float32 model outputs): more splits do not help
                busy &= ratio <= 0.5 * history[-1 - STALL_ROUNDS]
            if not bool(busy.any()):
                break
            rows = busy.nonzero().squeeze(-1)
            # split as many panels as the neediest row needs (at most `splits`): per row and data point, the worst
            # panels until the error left in the others is below tol / 2 (every row evaluates S panels)
            worst = err[rows].sort(-1, descending=True).values
            left = err[rows].sum(-1, keepdim=True) - worst.cumsum(-1)
            need = int((left >= tol / 2).sum(-1).amax()) + 1
            pick = err[rows].topk(min(splits, need, err.shape[-1]), dim=-1).indices  # (R, 2, S)
            ra, rb = a[rows].gather(-1, pick), b[rows].gather(-1, pick)
            mid = (ra + rb) / 2
            na, nb = torch.cat([ra, mid], -1), torch.cat([mid, rb], -1)  # (R, 2, 2S)
            shift = self.shift
            self.shift = {J: v[rows] for J, v in shift.items()}
            new = self._panels(u[rows], na, nb)
            for J in shift:  # rescale the rows' earlier estimates where _panels raised their shift
                factor = (shift[J][rows] - self.shift[J]).exp()  # (R, 2), 1 where unchanged
                for k in est:
                    if k == J or (J == "q" and k.startswith("qh:")):
                        est[k] = tuple(torch.index_put(e, (rows,), e[rows] * factor[..., None]) for e in est[k])
                shift[J] = torch.index_put(shift[J], (rows,), self.shift[J])
            self.shift = shift
            # the picked panels are replaced by their left halves; the right halves are appended (other rows pad)
            S = pick.shape[-1]
            a[rows] = a[rows].scatter(-1, pick, na[..., :S])
            b[rows] = b[rows].scatter(-1, pick, nb[..., :S])
            pad = torch.full(a.shape[:2] + (S,), self.lo, dtype=torch.float64)
            ea, eb = pad.clone(), pad.clone()
            ea[rows], eb[rows] = na[..., S:], nb[..., S:]
            a, b = torch.cat([a, ea], -1), torch.cat([b, eb], -1)
            for k, (K, G) in est.items():
                out = []
                for old, fresh in ((K, new[k][0]), (G, new[k][1])):
                    old = old.clone()
                    old[rows] = old[rows].scatter(-1, pick, fresh[..., :S])
                    extra = torch.zeros(old.shape[:2] + (S,), dtype=torch.float64)
                    extra[rows] = fresh[..., S:]
                    out.append(torch.cat([old, extra], -1))
                est[k] = tuple(out)
        total = {k: K.sum(-1) for k, (K, G) in est.items()}
        out = {"mean": {}, "at": self.at}
        if "q" in total:
            out["lq"] = total["q"].log() + self.shift["q"]
            for k in self.at:
                out["mean"][k] = total["qh:" + k] / total["q"].clamp_min(1e-300)
        if "p" in total:
            out["lp"] = total["p"].log() + self.shift["p"]
        return out


class Direct:
    """The 'inner integral' of a one-latent model: the densities at u themselves."""

    def __init__(self, dens: Densities, outer: str, parts=("q", "p")):
        self.d, self.outer, self.parts = dens, outer, parts

    def __call__(self, u, level: int = 0) -> dict:
        """Like Inner.__call__ for rows u (A, 2): 'lq', 'lp', and the site log-densities as 'mean' and 'at'."""
        step = self.d.rows(2)
        pieces = [self.d.logs({self.outer: u[s:s + step]}, self.parts) for s in range(0, u.shape[0], step)]
        logs = {k: torch.cat([p[k].expand(min(step, u.shape[0] - i * step), 2) for i, p in enumerate(pieces)])
                for k in pieces[0]}
        out = {"mean": logs, "at": logs}
        if "q" in self.parts:
            out["lq"] = sum(v for k, v in logs.items() if k.startswith("q:"))
        if "p" in self.parts:
            out["lp"] = sum(v for k, v in logs.items() if k.startswith("p:"))
        return out


def _kronrod(panels):
    """Kronrod nodes (P, 15, 2) and half-widths (P, 1, 2) of panels (P, 2, 2) = [a, b] per data point."""
    a, b = panels[:, 0], panels[:, 1]
    mid, half = (a + b) / 2, (b - a) / 2
    return mid[:, None] + half[:, None] * KRONROD_X[None, :, None], half[:, None]


class Outer:
    """Globally adaptive G7/K15 quadrature in u of the quantities an integrand function returns per u node."""

    def __init__(self, dens: Densities, fn, quantities, tol: float, shared: bool = False):
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


def _split_all(panels):
    """Every panel (P, 2, 2) split at its midpoint: (2P, 2, 2); a tuple of panel sets: each one."""
    if isinstance(panels, tuple):
        return tuple(_split_all(p) for p in panels)
    mid = panels.mean(1, keepdim=True)
    return torch.cat([torch.cat([panels[:, :1], mid], 1), torch.cat([mid, panels[:, 1:]], 1)])


class LossQuantities:
    """The quantities of exact(): the q mass, every site's E_q[log-density] and the model evidence, per data point.

    Per u node, fn returns 'lq' (log q-marginal), 'mean' (conditional E_q of each site log-density) and 'lp'
    (log p(x, u)); they become the integrands 'Zq' = q, 'T:<site key>' = q * mean and 'Zp' = p * exp(-ref).

    With `base` (a qdensity.BaseNoise of u) the nodes are the base noise eps of u = T(eps) instead, and the integrands
    are those of the expectations under q in eps, where q(u) du = base(eps) d eps: 'Zq' = base(eps) times the inner
    mass of q(v|u), 'T:<site key>' = that times the conditional mean, with log q(u|x) from the forward map. The
    evidence is not among them (p(x, u) du/d eps is as narrow in eps as q is in u where the map is steep)."""

    def __init__(self, dens: Densities, inner, ref, base: BaseNoise = None):
        self.d, self.inner, self.ref, self.base = dens, inner, ref, base  # ref (2,): log-shift of p(x, u)

    def __call__(self, nodes, level):
        if self.base is None:
            r = self.inner(nodes, level)
            q, mean = r["lq"].exp(), r["mean"]
            out = {"Zq": q, "Zp": (r["lp"] - self.ref).exp()}
        else:
            u, lq_u, lbase = self.base(nodes)
            r = self.inner(u, level)
            key = "q:" + self.d.bottom
            # log of the integral of q(v|u) over v (0 up to the inner rule; no v: 0)
            lmass = r["lq"] - r["mean"][key] if "lq" in r else torch.zeros_like(lbase)
            q, mean = (lbase + lmass).exp(), {**r["mean"], key: lq_u}
            out = {"Zq": q}
        for k, m in mean.items():
            out["T:" + k] = torch.where(q > 0, q * m, torch.zeros_like(q))
        return out

    def errors(self, est):
        """Per panel and data point, the largest |K15 - G7| difference among the reported numbers (nats)."""
        w = self.d.w
        diff = {k: (K - G).abs() for k, (K, G) in est.items()}
        loss = sum((est[k][0] - est[k][1]) * (1 if k.startswith("T:q:") else -1) for k in est if k.startswith("T:"))
        cands = [w * loss.abs(), diff["Zq"]] + [w * v for k, v in diff.items() if k.startswith("T:")]
        if "Zp" in est:
            cands.append(diff["Zp"] / est["Zp"][0].sum(0).clamp_min(1e-300))
        return torch.stack(cands).amax(0)


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


def _summarise(dens: Densities, est, ref) -> dict:
    """The reported numbers from per-panel Kronrod estimates (nats per data point)."""
    tot = {k: K.sum(0) for k, (K, G) in est.items()}
    w = dens.w
    per = {}
    per["recon"] = -sum(tot["T:p:" + n] for n in dens.observed)
    per["kl"] = {n: tot["T:q:" + n] - tot["T:p:" + n] for n in dens.latents}
    per["loss"] = per["recon"] + sum(per["kl"].values())
    per["log_px"] = tot["Zp"].log() + ref
    per["q_mass"] = tot["Zq"]
    return {
        "loss": float((w * per["loss"]).sum()), "recon": float((w * per["recon"]).sum()),
        "kl": {n: float((w * v).sum()) for n, v in per["kl"].items()},
        "log_px": [float(v) for v in per["log_px"]], "nll": float(-(w * per["log_px"]).sum()),
        "per_point": {"loss": [float(v) for v in per["loss"]], "recon": [float(v) for v in per["recon"]],
                      "kl": {n: [float(x) for x in v] for n, v in per["kl"].items()},
                      "q_mass": [float(v) for v in per["q_mass"]]},
    }


def _numbers(r: dict) -> list:
    """The numbers whose change under refinement is the reported error: every number exact() reports, per data
    point as well."""
    per = r["per_point"]
    return [r["loss"], r["recon"], *r["kl"].values(), *r["log_px"], *per["loss"], *per["recon"],
            *(v for values in per["kl"].values() for v in values)]


TAIL_LADDER = (1.0, 3.0, 9.0)  # breakpoints beyond a narrow draw set's extreme quantiles, in its robust sds


def _initial_breaks(draws: list, lo, hi, extra=12, narrow: list = ()):
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


def _adapt(outer, breaks, quantities=None):
    """outer.run from breaks, extending the range (up to 4 times) until the integrands (`quantities`; None: all of
    them) vanish at both ends."""
    panels, est = outer.run(breaks)
    for _ in range(4):
        extra = _edge_panels(panels, est, quantities or list(est))
        if extra is None:
            break
        more = outer.evaluate(extra, 0)
        panels = torch.cat([panels, extra])
        est = {k: tuple(torch.cat([a, b]) for a, b in zip(est[k], more[k])) for k in est}
        panels, est = outer.run(panels=panels, est=est)
    return panels, est


def _evidence_setup(dens: Densities, parts) -> tuple:
    """(inner, initial breakpoints, ref, '1-D' | '2-D') for integrals over the bottom latent u of a model, with
    the other latent integrated inside; ranges from guide and prior draws; ref = the largest log-likelihood among
    the prior draws per data point (the shift of the evidence integrand)."""
    draws = dens.samples()
    u_name, v_name = dens.bottom, dens.other
    u_q, u_p = draws["q:" + u_name], draws["p:" + u_name]
    lo, hi = zip(*[sample_range(torch.stack([u_q[:, k], u_p[:, k]], 1)) for k in range(2)])
    lo, hi = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    if v_name is None:
        inner, describe = Direct(dens, u_name, parts), "1-D"
    else:
        vlo, vhi = sample_range(torch.cat([draws["q:" + v_name], draws["p:" + v_name]]))
        inner, describe = Inner(dens, u_name, v_name, vlo, vhi, parts), "2-D"
    return inner, _initial_breaks([u_q, u_p], lo, hi), draws["p:loglik"].reshape(-1, 2).amax(0), describe


def _base_setup(dens: Densities) -> tuple:
    """The inner integral at given u for the expectations under q in the base noise of u: the densities at u alone
    (one latent: the guide's log q(u|x) comes from the forward map, so the guide is not conditioned), or the adaptive
    integral over v (two latents; its q integrand supplies q(v|u))."""
    if dens.other is None:
        return (Direct(dens, dens.bottom, ("p",)),)
    draws = dens.samples()
    vlo, vhi = sample_range(torch.cat([draws["q:" + dens.other], draws["p:" + dens.other]]))
    return (Inner(dens, dens.bottom, dens.other, vlo, vhi, ("q", "p")),)


def _base_breaks(dens: Densities, count: int = 4096, seed: int = 0):
    """Initial breakpoints (NB, 2) in the base noise of the bottom site, from quantiles of its draws (fixed seed)."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        eps = dens.base.sample(count, 2)
    lo, hi = zip(*[sample_range(eps[:, k]) for k in range(2)])
    return _initial_breaks([eps], torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))


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


def _refine(outer, panels, result, summarise, numbers, tol, est=None) -> tuple:
    """Split every panel in two and tighten the inner tolerance tenfold, up to 3 times, until the reported numbers
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


@flush_denormals()
def exact(model, guide, data, tol: float = 1e-4) -> dict:
    """The loss terms and the evidence by quadrature, in nats per data point: a dict with loss, recon,
    recon_per_dim, kl {site: E_q[log q(site|.) - log p(site|.)]}, log_px [log p(x_k)], nll = -sum_k w_k log p(x_k),
    gap = loss - nll, error (largest change of loss, recon, kl, log_px under refinement), estimator, and per_point
    {loss, recon, kl, q_mass} per data point.

    A joint guide (one density over both data points, e.g. Pyro's AutoIAFNormal on the VAE) is evaluated through its
    marginals q(z|x_k), and its rate gets the extra total_correlation_per_point = KL(q(z_0, z_1) || q(z_0|x_0)
    q(z_1|x_1)) / N (per_point then holds the marginal terms); marginal_error is the marginals' own quadrature
    error (q-weighted relative error, included in error).

    Raises ValueError when q(z|x_k) does not integrate to 1 on the grid (a guide without a density there, e.g.
    AutoLaplaceApproximation's; a point mass such as AutoDelta is refused before, by the input check). A guide
    with bounded support (a Uniform q) has log q = -inf outside it (qdensity.log_prob64).

    Pass the unweighted model and guide (the data weights are applied here). Raises ValueError for more than two
    scalar latents (use analysis.iwae.iwae then)."""
    _check(model, guide, data, tol=tol)
    dens = Densities(model, guide, data)
    u_name, v_name = dens.bottom, dens.other
    if dens.base is None:
        inner, breaks, ref, describe = _evidence_setup(dens, ("q", "p"))
        quant = LossQuantities(dens, inner, ref)
        outer = Outer(dens, quant, quant, tol)
        panels, est = _adapt(outer, breaks)
    else:  # a flow guide: the expectations under q in its base noise, the evidence in u
        inner_p, breaks_p, ref, describe = _evidence_setup(dens, ("p",))
        evidence_quant = EvidenceQuantities(dens, inner_p, ref)
        evidence_outer = Outer(dens, evidence_quant, evidence_quant, tol)
        q_quant = LossQuantities(dens, *_base_setup(dens), ref, dens.base)
        q_outer = Outer(dens, q_quant, q_quant, tol)
        panels_q, est = _adapt(q_outer, _base_breaks(dens))
        panels_p, est_p = _adapt(evidence_outer, breaks_p)
        outer, panels = Joined(q_outer, evidence_outer), (panels_q, panels_p)
        est.update(est_p)
    result = _summarise(dens, est, ref)
    mass = result["per_point"]["q_mass"]
    if any(abs(m - 1) > MASS_TOLERANCE for m in mass):
        raise ValueError(f"q(z|x_k) integrates to {[round(m, 4) for m in mass]} on the quadrature grid, not 1: the "
                         "guide has no density there (a point mass such as AutoDelta or AutoLaplaceApproximation?)")
    panels, est, result, error = _refine(outer, panels, result, lambda e: _summarise(dens, e, ref), _numbers, tol,
                                         est)
    if dens.base is None:
        nodes, joint_note = f"{panels.shape[0] * 15} nodes per data point", ""
    else:
        nodes, joint_note = (f"{panels[1].shape[0] * 15} nodes per data point for the evidence; the expectations "
                             f"under q in the base noise eps of the guide's flow, {u_name} = T(eps), by adaptive "
                             f"Gauss-Kronrod 15 on {panels[0].shape[0] * 15} nodes"), ""
    if dens.joint:  # the joint guide's rate exceeds the marginals' by the total correlation of q over the points
        check = dens._marginal().check()
        h_marginals = -est["T:q:" + u_name][0].sum(0)  # H[q(z|x_k)], k = 0, 1
        extra = (float(h_marginals.sum()) - check["entropy"]) / len(h_marginals)
        result["kl"][u_name] += extra
        result["loss"] += extra
        result["total_correlation_per_point"] = extra
        result["marginal_error"] = check["marginal_error"]
        error = max(error, check["entropy_error"] / 2, abs(1 - check["mass"]), check["marginal_error"])
        joint_note = (f"; joint guide: q({u_name}|x_k) is its marginal and its entropy a 2-D integral, by "
                      f"Gauss-Kronrod 15 on {MARGINAL_PANELS} panels per point")
    result.update({
        "recon_per_dim": result["recon"] / data.n,
        "gap": result["loss"] - result["nll"],
        "error": error,
        "estimator": (f"exact quadrature ({describe}: adaptive Gauss-Kronrod 15 in {u_name}, {nodes}"
                      + (f"; per node, adaptive Gauss-Kronrod 15 in {v_name} seeded at the features of q and p"
                         if v_name else "") + joint_note + f"; error = change under refinement, {error:.1e})"),
    })
    return result


class EvidenceQuantities:
    """The integrand of the evidence alone: 'Zp' = p(x_k, u) exp(-ref) per u node (the guide is not read)."""

    def __init__(self, dens: Densities, inner, ref):
        self.d, self.inner, self.ref = dens, inner, ref

    def __call__(self, u, level):
        return {"Zp": (self.inner(u, level)["lp"] - self.ref).exp()}

    def errors(self, est):
        """Per panel and data point, |K15 - G7| of the evidence relative to its total (nats of log p(x_k))."""
        K, G = est["Zp"]
        return (K - G).abs() / K.sum(0).clamp_min(1e-300)


@flush_denormals()
def evidence(model, guide, data, tol: float = 1e-4) -> dict:
    """log p(x_k) and the NLL by quadrature of the model alone, in nats per data point: {log_px, nll, error,
    estimator}. The guide only places the first breakpoints (its draws sit near the posterior), so this works for
    any guide, also one whose own density quadrature cannot integrate (a joint guide on the DLGM)."""
    _check(model, guide, data, tol=tol)
    dens = Densities(model, guide, data, need_q=False)
    inner, breaks, ref, describe = _evidence_setup(dens, ("p",))
    quant = EvidenceQuantities(dens, inner, ref)
    outer = Outer(dens, quant, quant, tol)
    panels, est = _adapt(outer, breaks, ("Zp",))

    def summarise(e):
        log_px = e["Zp"][0].sum(0).log() + ref
        return {"log_px": [float(v) for v in log_px], "nll": float(-(dens.w * log_px).sum())}

    panels, est, result, error = _refine(outer, panels, summarise(est), summarise, lambda r: r["log_px"], tol, est)
    result.update({"error": error, "estimator": f"exact quadrature of the model alone ({describe} in "
                   f"{', '.join(dens.latents)}, {panels.shape[0] * 15} nodes per data point in {dens.bottom}; "
                   f"error = change under refinement, {error:.1e})"})
    return result


class SurgeryQuantities:
    """Integrands of ELBO surgery on one shared grid of the top latent t: q_k(t), q_k log(q_k / p),
    q_k log(q_k / q_agg) and q_agg log(q_agg / p), with q_agg = sum_k w_k q_k."""

    def __init__(self, dens: Densities, inner, top, other):
        self.d, self.inner, self.top, self.other = dens, inner, top, other

    def __call__(self, t, level):
        lq = self.inner(t, level)["lq"]  # log q(t|x_k)
        step, lp = self.d.rows(2), []  # chunked: without another latent the prior's trace runs the decoder on t
        for s in range(0, t.shape[0], step):
            vals = {self.top: t[s:s + step, :1].expand(-1, 2)}
            if self.other is not None:
                vals[self.other] = torch.zeros(1, 2, dtype=torch.float64)
            lp.append(self.d.logs(vals, ("p",))["p:" + self.top].expand(vals[self.top].shape))
        lp = torch.cat(lp)
        lagg = _lse(lq + self.d.w.log(), 1)[:, None].expand_as(lq)
        q, agg = lq.exp(), lagg.exp()

        def xlog(a, b):
            return torch.where(a > 0, a * b, torch.zeros_like(a))

        return {"Zq": q, "KL": xlog(q, lq - lp), "MI": xlog(q, lq - lagg), "KLagg": xlog(agg, lagg - lp)}

    def errors(self, est):
        """Per panel and data point, the largest |K15 - G7| difference of the surgery integrals (nats)."""
        w = self.d.w
        d = {k: (K - G).abs() for k, (K, G) in est.items()}
        return torch.stack([d["Zq"], w * d["KL"], w * d["MI"], d["KLagg"]]).amax(0)


def _surgery_numbers(dens, est):
    """avg_kl, mutual_info, marginal_kl, residual and per-point KL and q mass from per-panel Kronrod estimates."""
    tot = {k: K.sum(0) for k, (K, G) in est.items()}
    w = dens.w
    avg, mi, agg = float((w * tot["KL"]).sum()), float((w * tot["MI"]).sum()), float(tot["KLagg"][0])
    return {"avg_kl": avg, "mutual_info": mi, "marginal_kl": agg, "residual": avg - mi - agg,
            "kl_per_point": [float(v) for v in tot["KL"]], "q_mass": [float(v) for v in tot["Zq"]]}


@flush_denormals()
def surgery(model, guide, data, tol: float = 1e-4) -> dict:
    """ELBO surgery for the top latent t (z, or z2 of the DLGM): avg_kl = sum_k w_k KL(q(t|x_k) || p(t)) splits
    into mutual_info I_q(x; t) plus marginal_kl KL(q(t) || p(t)); also residual, entropy H(w), error, estimator.

    q(t|x_k) is the guide's marginal (for the DLGM with the structured guide, the integral of q(z1|x) q(z2|z1) over
    z1), computed on a grid of t shared by both data points, so the identity holds node by node. Raises ValueError
    where q(t|x_k) does not integrate to 1 on that grid (its numbers would mean nothing). For a joint guide
    q(t|x_k) is its marginal, so avg_kl is the marginals' average KL: exact()'s KL is larger by its
    total_correlation_per_point."""
    _check(model, guide, data, tol=tol)
    dens = Densities(model, guide, data)
    draws = dens.samples()
    top, other = dens.top, (dens.bottom if dens.other is not None else None)
    lo, hi = sample_range(torch.cat([draws["q:" + top], draws["p:" + top]]))
    if other is None:
        inner = Direct(dens, top, ("q",))
    else:
        ulo, uhi = sample_range(torch.cat([draws["q:" + other], draws["p:" + other]]))
        inner = Inner(dens, top, other, ulo, uhi, ("q",))
    quant = SurgeryQuantities(dens, inner, top, other)
    outer = Outer(dens, quant, quant, tol, shared=True)
    lo_t, hi_t = torch.tensor([lo, lo], dtype=torch.float64), torch.tensor([hi, hi], dtype=torch.float64)
    every = torch.cat([draws["q:" + top], draws["p:" + top]]).reshape(-1, 1).expand(-1, 2)
    own = [draws["q:" + top][:, k:k + 1].expand(-1, 2) for k in range(2)]  # each point's q(t|x_k): a needle?
    panels, est = _adapt(outer, _initial_breaks([every], lo_t, hi_t, narrow=own), ("Zq", "KLagg"))
    keys = ("avg_kl", "mutual_info", "marginal_kl")
    mass = _surgery_numbers(dens, est)["q_mass"]
    if any(abs(m - 1) > MASS_TOLERANCE for m in mass):
        raise ValueError(f"q({top}|x_k) integrates to {[round(m, 4) for m in mass]} on the surgery's grid of {top}, "
                         "not 1: no ELBO surgery")
    panels, est, result, error = _refine(outer, panels, _surgery_numbers(dens, est),
                                         lambda e: _surgery_numbers(dens, e), lambda r: [r[k] for k in keys], tol,
                                         est)
    result.update({"site": top, "entropy": data.entropy, "error": error,
                   "estimator": f"exact quadrature (adaptive Gauss-Kronrod 15 in {top}, {panels.shape[0] * 15} nodes"
                                + (f"; q({top}|x) by adaptive Gauss-Kronrod 15 over {other}" if other else "")
                                + f"; error = change under refinement, {error:.1e})"})
    return result


def _weighted_quantiles(values, logw, probs):
    """Quantiles of values (S,) under normalised weights exp(logw) (S,)."""
    order = values.argsort()
    v, w = values[order], (logw[order] - logw.max()).exp()
    cdf = w.cumsum(0) / w.sum()
    idx = torch.searchsorted(cdf, torch.tensor(probs, dtype=cdf.dtype)).clamp(max=len(v) - 1)
    return v[idx]


@flush_denormals()
def posterior_grid(model, guide, data, points: int = 201, log_px=None) -> dict:
    """Per latent site, numpy arrays on a regular grid: 'grid' (N,), 'prior' p(site) (N,) (for z1 of the DLGM the
    learned marginal), 'q' q(site|x_k) (2, N), 'q_aggregate' sum_k w_k q(site|x_k) (N,) and 'posterior'
    p(site|x_k) (2, N). Also 'weights', 'log_px' (from exact() unless given) and 'checks' (grid masses)."""
    _check(model, guide, data, points=points)
    dens = Densities(model, guide, data)
    draws = dens.samples()
    if log_px is None:
        from infer.fit import inputs_checked

        with inputs_checked(model, guide, data):  # checked above
            log_px = exact(model, guide, data)["log_px"]
    log_px = torch.tensor(log_px, dtype=torch.float64)
    w = dens.w
    out = {"weights": w.numpy(), "log_px": log_px.numpy(), "checks": {}}
    loglik = draws["p:loglik"].reshape(-1, 2)
    for site in dens.latents:
        q, p = draws["q:" + site], draws["p:" + site]
        sets = [q.reshape(-1), p[:, 0]] + [_weighted_quantiles(p[:, k], loglik[:, k], [0.0005, 0.9995])
                                          for k in range(2)]
        lows = [torch.quantile(s, 0.0005) if s.numel() > 2 else s.min() for s in sets]
        highs = [torch.quantile(s, 0.9995) if s.numel() > 2 else s.max() for s in sets]
        lo, hi = float(min(lows)), float(max(highs))
        lo, hi = lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo)
        grid = torch.linspace(lo, hi, points, dtype=torch.float64)
        rows = grid[:, None].expand(-1, 2)
        other = dens.other if site == dens.bottom else dens.bottom
        if dens.other is None:
            r = Direct(dens, site)(rows)
            lq, lp, lprior = r["lq"], r["lp"], r["at"]["p:" + site]
        elif site == dens.bottom:
            vlo, vhi = sample_range(torch.cat([draws["q:" + other], draws["p:" + other]]))
            r = Inner(dens, site, other, vlo, vhi)(rows)
            lq, lp = r["lq"], r["lp"]
            lprior = lp - sum(r["at"]["p:" + n] for n in dens.observed)
        else:
            ulo, uhi = sample_range(torch.cat([draws["q:" + other], draws["p:" + other]]))
            lq = Inner(dens, site, other, ulo, uhi, ("q",))(rows)["lq"]
            lp, lprior, mass = _top_joint(dens, site, other, grid, ulo, uhi)
            out["checks"][f"p({other}|{site}) mass on the {other} grid (min, max)"] = (float(mass.min()),
                                                                                       float(mass.max()))
        post = (lp - log_px).exp()
        step = float(grid[1] - grid[0])
        out["checks"][f"{site}: trapezoid mass of q(.|x_k), posterior"] = (
            (lq.exp().sum(0) * step).tolist(), (post.sum(0) * step).tolist())
        out[site] = {"grid": grid.numpy(), "prior": lprior[:, 0].exp().numpy(), "q": lq.exp().T.numpy(),
                     "q_aggregate": (lq.exp() * w).sum(1).numpy(), "posterior": post.T.numpy()}
    return out


def _top_joint(dens, top, bottom, grid, ulo, uhi, max_nodes=20000):
    """log p(x_k, t), log p(t) on grid (N,) for the top latent t, integrating the bottom latent u over one shared
    Gauss-Legendre grid fine enough for the narrowest p(u|t) (so the decoder runs once per u node); also the mass
    of p(u|t) on that grid per t (should be 1)."""
    t = grid[:, None].expand(-1, 2)
    probe = {top: t, bottom: torch.zeros(1, 2, dtype=torch.float64)}
    vals = {k: v.float().unsqueeze(-1) for k, v in probe.items()}
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(poutine.condition(dens.model, data=vals)).get_trace(dens.x)
    fn = tr.nodes[bottom]["fn"]
    try:
        mean, sd = fn.mean.double().reshape(-1), fn.stddev.double().reshape(-1)
        ulo, uhi = min(ulo, float((mean - 12 * sd).min())), max(uhi, float((mean + 12 * sd).max()))
        panel = float(sd.min()) / 2
    except NotImplementedError:
        panel = (uhi - ulo) / 2000
    count = int(min(max((uhi - ulo) / panel, 64), max_nodes // 8))
    edges = torch.linspace(ulo, uhi, count + 1, dtype=torch.float64)
    x, wgl = _gauss_legendre(8)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    nodes = ((edges[1:] + edges[:-1])[:, None] / 2 + half * x).reshape(-1)
    lw = (half * wgl).reshape(-1).log()
    step, lcond, llik = dens.rows(2), [], []
    for s in range(0, len(nodes), step):
        u = nodes[s:s + step]
        logs = dens.logs({bottom: u[:, None, None].expand(-1, 1, 2), top: t[None]}, ("p",))
        lcond.append(logs["p:" + bottom].expand(len(u), len(grid), 2))
        llik.append(sum(logs["p:" + n] for n in dens.observed).expand(len(u), len(grid), 2))
        lprior = logs["p:" + top].expand(len(u), len(grid), 2)[0]
    lcond, llik = torch.cat(lcond), torch.cat(llik)
    lp = lprior + _lse(lw[:, None, None] + lcond + llik, 0)
    mass = _lse(lw[:, None, None] + lcond, 0).exp()[:, 0]
    return lp, lprior, mass
