"""Exact evaluation by deterministic quadrature for models with at most two scalar latents (VAE d=1, DLGM 2x1).

Every density comes from tracing the model and the guide under `poutine.condition` on grids of latent values, so
any guide that samples the model's latent sites works. Names: u is the model's bottom latent (the parent of x: z
of the VAE, z1 of the DLGM) and v the other one (z2). Integrals run over u outside and v inside:

* outside, globally adaptive Gauss-Kronrod (7, 15) panels in u, split where the G7/K15 difference is largest;
* inside, per u node and data point, a v grid built around the features of q(u, v|x) and p(x, u, v) as functions of
  v: their local maxima are found on a dense grid, zoomed in on, and their widths measured on each side; panel
  breakpoints are laid at multiples of those widths (plus a uniform background), each panel gets Gauss-Legendre
  nodes. A steep prior map z2 -> z1 makes p(z1|z2) a needle in z2; this puts the nodes on it.

Everything is summed in log space. Accuracy is proven by refinement: the result is recomputed with every u panel
split in two and twice the v nodes per panel, and the change is reported as the error.
"""
import math

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

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

LADDER = (0.0, 1.0, 2.2, 3.6, 5.4, 8.0, 12.0)  # breakpoints at m +- c * width
LOCATE_POINTS = 2049  # dense grid that finds the features of the inner integrand
CANDIDATES = 2  # features kept per density (q, p) per row
INNER_NODES = 8  # Gauss-Legendre nodes per inner panel (times 2**level)
BACKGROUND = 16  # uniform inner breakpoints that cover what no feature claims
MASS_WINDOW = 40.0  # features with Laplace mass below the best by more than this many nats are dropped
CHUNK = 400_000  # latent points per model/guide evaluation


def _lse(t, dim):
    """logsumexp that returns -inf (not nan) for all -inf slices."""
    m = t.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (t - m).exp().sum(dim).log() + m.squeeze(dim)


def _log_prob64(site):
    """A site's log-density at its value, evaluated in float64 (the parameters stay float32) when the
    distribution allows it: log p(z1|z2) reaches 1e4 nats in the tails, where float32 keeps only ~1e-3."""
    try:
        return site["fn"].log_prob(site["value"].double()).double()
    except (RuntimeError, TypeError, ValueError):
        return site["fn"].log_prob(site["value"]).double()


class Densities:
    """Site log-densities of a model and guide on grids of latent values, read through poutine.condition/trace."""

    def __init__(self, model, guide, data):
        self.model, self.guide, self.data, self.x = model, guide, data, data.x
        with torch.no_grad(), poutine.block():
            mt = poutine.trace(model).get_trace(self.x)
            gt = poutine.trace(guide).get_trace(self.x)

        def sample_sites(tr, observed):
            return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
                    and bool(s["is_observed"]) == observed]

        self.latents, self.observed = sample_sites(mt, False), sample_sites(mt, True)
        guide_sites = sample_sites(gt, False)
        if set(guide_sites) != set(self.latents):
            raise ValueError(f"the guide samples {guide_sites} but the model's latent sites are {self.latents}; "
                             "exact quadrature needs a guide over exactly the model's latents")
        points = self.x.shape[-2]
        sizes = {n: mt.nodes[n]["value"].numel() // points for n in self.latents}
        if sum(sizes.values()) > 2 or any(s != 1 for s in sizes.values()):
            raise ValueError(f"exact quadrature handles at most 2 scalar latents, one per site; this model has "
                             f"{', '.join(f'{n}: {s}' for n, s in sizes.items())} scalars per data point; "
                             "use analysis.iwae.iwae instead")
        self.guide_order = guide_sites
        self.bottom = self.latents[-1]  # the parent of x (z, z1)
        self.top = self.latents[0]  # the latent whose prior has no parents (z, z2)
        self.other = self.latents[0] if len(self.latents) == 2 else None
        self.w = data.w.double()

    def logs(self, values: dict, parts=("q", "p")) -> dict:
        """{'q:site' | 'p:site': float64 log-density} for every guide/model site at the given latent values.

        values maps site -> float64 tensor (..., 2) (last dim = data point); shapes broadcast."""
        vals = {k: v.float().unsqueeze(-1) for k, v in values.items()}
        out = {}
        with torch.no_grad(), poutine.block():
            if "q" in parts:
                tr = poutine.trace(poutine.condition(self.guide, data=vals)).get_trace(self.x)
                for n in self.latents:
                    out["q:" + n] = _log_prob64(tr.nodes[n])
            if "p" in parts:
                tr = poutine.trace(poutine.condition(self.model, data=vals)).get_trace(self.x)
                for n in self.latents + self.observed:
                    out["p:" + n] = _log_prob64(tr.nodes[n])
        return out

    def samples(self, count: int = 4096, seed: int = 0) -> dict:
        """Draws of every latent from the guide ('q:site', shape (count, 2)) and the model prior ('p:site'), plus the
        log-likelihood of each prior draw ('p:loglik'); fixed seed, so results are deterministic."""
        out = {}
        with torch.no_grad(), torch.random.fork_rng(), poutine.block():
            torch.manual_seed(seed)
            with pyro.plate("_exact_particles", count, dim=-2):
                gt = poutine.trace(self.guide).get_trace(self.x)
                mt = poutine.trace(self.model).get_trace(self.x)
        for n in self.latents:
            out["q:" + n] = gt.nodes[n]["value"].reshape(count, 2).double()
            out["p:" + n] = mt.nodes[n]["value"].reshape(count, -1).double().expand(count, 2)
        out["p:loglik"] = sum(mt.nodes[n]["fn"].log_prob(mt.nodes[n]["value"]).double() for n in self.observed)
        return out


def sample_range(draws: torch.Tensor, pad: float = 10.0) -> tuple:
    """(lo, hi) covering draws (count, ...) beyond their 0.1% / 99.9% quantiles by `pad` robust standard deviations."""
    d = draws.reshape(-1)
    d = d[torch.isfinite(d)]
    q = torch.quantile(d, torch.tensor([0.001, 0.16, 0.84, 0.999], dtype=d.dtype))
    s = max(float(q[2] - q[1]) / 2, 1e-3)
    return float(q[0]) - pad * s, float(q[3]) + pad * s


def _gauss_legendre(m: int):
    x, w = np.polynomial.legendre.leggauss(m)
    return torch.tensor(x), torch.tensor(w)


class Inner:
    """The inner integral over v at given u values (one per row and data point), by feature-adapted panels."""

    def __init__(self, dens: Densities, outer: str, inner: str, lo: float, hi: float, parts=("q", "p")):
        self.d, self.outer, self.inner, self.lo, self.hi, self.parts = dens, outer, inner, lo, hi, parts

    def _eval(self, u, v):
        """Site log-densities at u (A, 2) against v (A, B, 2) or (1, B, 2), chunked over rows: dict of (A, B, 2)."""
        rows = max(1, CHUNK // (2 * v.shape[1]))
        pieces = []
        for s in range(0, u.shape[0], rows):
            vs = v[s:s + rows] if v.shape[0] > 1 else v
            pieces.append(self.d.logs({self.outer: u[s:s + rows, None, :], self.inner: vs}, self.parts))
        sizes = [min(rows, u.shape[0] - s) for s in range(0, u.shape[0], rows)]
        return {k: torch.cat([p[k].expand(n, v.shape[1], 2) for p, n in zip(pieces, sizes)]) for k in pieces[0]}

    def _joint(self, logs):
        """{J: log joint} for J in the parts: log q(u, v|x) and log p(x, u, v)."""
        return {J: sum(val for key, val in logs.items() if key.startswith(J + ":")) for J in self.parts}

    def features(self, u):
        """Panels (a, b), each (A, 2, P), between breakpoints laid around the modes of q(u, .) and p(x, u, .) in v, for rows u (A, 2)."""
        A = u.shape[0]
        grid = torch.linspace(self.lo, self.hi, LOCATE_POINTS, dtype=torch.float64)
        h = float(grid[1] - grid[0])
        ell = self._joint(self._eval(u, grid[None, :, None].expand(1, -1, 2)))
        centres = []
        for J in self.parts:
            e = ell[J].transpose(1, 2)  # (A, 2, L)
            e = torch.nan_to_num(e, nan=-math.inf)
            pooled = torch.nn.functional.max_pool1d(e.reshape(-1, 1, e.shape[-1]), 7, 1, 3).reshape(e.shape)
            peak = e >= pooled
            score = torch.where(peak, e, torch.full_like(e, -math.inf))
            idx = score.topk(CANDIDATES, dim=-1).indices  # (A, 2, C): the highest local maxima
            # and the most under-resolved ones: a needle between grid points shows as a local maximum far below
            # its true height with a steep drop to a neighbour (a peak of width w drops ~h^2 / 2w^2: more than 0.5 nats means narrower than a cell)
            pad = torch.full_like(e[..., :1], -math.inf)
            left, right = torch.cat([pad, e[..., :-1]], -1), torch.cat([e[..., 1:], pad], -1)
            strict = (e >= left) & (e >= right)
            deficit = torch.maximum(e - left, e - right).nan_to_num(0.0, posinf=1e300)
            sharp = torch.where(strict & (deficit > 0.5) & torch.isfinite(e), deficit, torch.zeros_like(e))
            top_sharp = sharp.topk(CANDIDATES, dim=-1)
            idx_sharp = torch.where(top_sharp.values > 0, top_sharp.indices, idx[..., :1])
            centres.append(grid[torch.cat([idx, idx_sharp], -1)])
        c = torch.cat(centres, -1)  # (A, 2, F)
        F = c.shape[-1]
        per = 2 * CANDIDATES
        which = {J: slice(i * per, (i + 1) * per) for i, J in enumerate(self.parts)}

        def values_at(points):  # points (A, 2, F, S) -> per-feature own-density values (A, 2, F, S)
            S = points.shape[-1]
            v = points.permute(0, 2, 3, 1).reshape(A, F * S, 2)
            lj = self._joint(self._eval(u, v))
            out = torch.empty(A, 2, F, S, dtype=torch.float64)
            for J, sl in which.items():
                out[:, :, sl] = lj[J].reshape(A, F, S, 2).permute(0, 3, 1, 2)[:, :, sl]
            return torch.nan_to_num(out, nan=-math.inf)

        # zoom: 17 points over the bracket, keep the best, shrink by 8, until the bracket is flat to 0.05 nats
        half = torch.full_like(c, h)
        steps = torch.linspace(-1, 1, 17, dtype=torch.float64)
        best = None
        for _ in range(14):
            pts = c[..., None] + half[..., None] * steps
            val = values_at(pts)
            arg = val.argmax(-1, keepdim=True)
            best = val.gather(-1, arg).squeeze(-1)
            c = pts.gather(-1, arg).squeeze(-1)
            spread = best - val.amin(-1)
            busy = ~(spread < 0.05) & torch.isfinite(best)
            if not bool(busy.any()):
                break
            half = torch.where(busy, half / 8, half)
        # widths: on each side, the first offset of a geometric ladder where the density drops by 1 nat
        span = self.hi - self.lo
        deltas = torch.logspace(-10, math.log10(span), 72, dtype=torch.float64)
        side = torch.cat([-deltas, deltas])
        val = values_at(c[..., None] + side)
        top = torch.maximum(best, val.amax(-1))
        drop = top[..., None] - val >= 1.0
        width = []
        for part in (drop[..., :72], drop[..., 72:]):
            first = torch.where(part.any(-1), part.float().argmax(-1), torch.full_like(top, 71, dtype=torch.long))
            width.append(deltas[first] / math.sqrt(2))
        wl, wr = width
        mass = top + torch.log(wl + wr)
        keep = torch.zeros_like(mass, dtype=torch.bool)
        for J, sl in which.items():
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

    def _block(self, u, level):
        a, b = self.features(u)
        pieces = 2 ** level
        t = torch.arange(pieces + 1, dtype=torch.float64) / pieces
        edges = a[..., None] + (b - a)[..., None] * t  # (A, 2, P, pieces + 1)
        lo_e, hi_e = edges[..., :-1], edges[..., 1:]
        x, w = _gauss_legendre(INNER_NODES)
        nodes = (lo_e + hi_e)[..., None] / 2 + (hi_e - lo_e)[..., None] / 2 * x
        weights = (hi_e - lo_e)[..., None] / 2 * w
        A = u.shape[0]
        nodes, weights = nodes.reshape(A, 2, -1).transpose(1, 2), weights.reshape(A, 2, -1).transpose(1, 2)
        logs = self._eval(u, nodes)
        lw = weights.log()
        out = {"mean": {}}
        joint = self._joint(logs)
        if "q" in joint:
            lq = _lse(lw + joint["q"], 1)
            out["lq"] = lq
            pw = (lw + joint["q"] - lq[:, None]).exp()
            pw = torch.nan_to_num(pw)
            for k, val in logs.items():
                out["mean"][k] = (pw * torch.where(pw > 0, val, torch.zeros_like(val))).sum(1)
        if "p" in joint:
            out["lp"] = _lse(lw + joint["p"], 1)
        out["at"] = {k: val[:, 0] for k, val in logs.items()}  # values at the first node (for v-free terms)
        return out


class Direct:
    """The 'inner integral' of a one-latent model: the densities at u themselves."""

    def __init__(self, dens: Densities, outer: str, parts=("q", "p")):
        self.d, self.outer, self.parts = dens, outer, parts

    def __call__(self, u, level: int = 0) -> dict:
        logs = self.d.logs({self.outer: u}, self.parts)
        logs = {k: v.expand(u.shape) for k, v in logs.items()}
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

    def run(self, breaks, level=0, max_panels=600):
        """Adapt panels starting from sorted breakpoints (NB, 2); returns (panels, per-panel estimates)."""
        panels = torch.stack([breaks[:-1], breaks[1:]], 1)
        est = self.evaluate(panels, level)
        for _ in range(60):
            err = self.quantities.errors(est)  # (P, 2)
            if self.shared:
                err = err.amax(1, keepdim=True).expand_as(err)
            total = err.sum(0)
            target = self.tol / 4
            if bool((total < target).all()) or panels.shape[0] >= max_panels:
                break
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
    mid = panels.mean(1, keepdim=True)
    return torch.cat([torch.cat([panels[:, :1], mid], 1), torch.cat([mid, panels[:, 1:]], 1)])


class LossQuantities:
    """The quantities of exact(): the q mass, every site's E_q[log-density] and the model evidence, per data point.

    Per u node, fn returns 'lq' (log q-marginal), 'mean' (conditional E_q of each site log-density) and 'lp'
    (log p(x, u)); they become the integrands 'Zq' = q, 'T:<site key>' = q * mean and 'Zp' = p * exp(-ref)."""

    def __init__(self, dens: Densities, inner, ref):
        self.d, self.inner, self.ref = dens, inner, ref  # ref (2,): log-shift of p(x, u)

    def __call__(self, u, level):
        r = self.inner(u, level)
        q = r["lq"].exp()
        out = {"Zq": q, "Zp": (r["lp"] - self.ref).exp()}
        for k, m in r["mean"].items():
            out["T:" + k] = torch.where(q > 0, q * m, torch.zeros_like(q))
        return out

    def errors(self, est):
        """Per panel and data point, the largest |K15 - G7| difference among the reported numbers (nats)."""
        w = self.d.w
        diff = {k: (K - G).abs() for k, (K, G) in est.items()}
        zp = est["Zp"][0].sum(0).clamp_min(1e-300)
        loss = sum((est[k][0] - est[k][1]) * (1 if k.startswith("T:q:") else -1) for k in est if k.startswith("T:"))
        cands = [w * loss.abs(), diff["Zq"], diff["Zp"] / zp] + [w * v for k, v in diff.items() if k.startswith("T:")]
        return torch.stack(cands).amax(0)


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
    return [r["loss"], r["recon"], *r["kl"].values(), *r["log_px"]]


def _initial_breaks(draws: list, lo, hi, extra=12):
    """Sorted breakpoints (NB, 2) from quantiles of each (count, 2) draw set, plus a uniform set over [lo, hi]."""
    probs = torch.tensor([0.001, 0.02, 0.16, 0.5, 0.84, 0.98, 0.999], dtype=torch.float64)
    qs = [torch.quantile(d, probs, dim=0) for d in draws]
    uni = torch.stack([torch.linspace(float(lo[k]), float(hi[k]), extra, dtype=torch.float64) for k in range(2)], -1)
    b = torch.cat(qs + [uni])
    return torch.maximum(torch.minimum(b, hi), lo).sort(0).values


def _edge_ok(panels, est, quantity="Zq", margin=30.0):
    """Whether the integrand density at both ends of the range is below exp(-margin) of its peak."""
    width = panels[:, 1] - panels[:, 0]
    dens = est[quantity][0] / width.clamp_min(1e-300)
    inf = torch.full_like(width, math.inf)
    first = dens.gather(0, torch.where(width > 0, panels[:, 0], inf).argmin(0, keepdim=True))
    last = dens.gather(0, torch.where(width > 0, panels[:, 1], -inf).argmax(0, keepdim=True))
    peak = dens.amax(0, keepdim=True)
    return bool(((first <= peak * math.exp(-margin)) & (last <= peak * math.exp(-margin))).all())


def exact(model, guide, data, tol: float = 1e-4) -> dict:
    """Loss, recon, recon_per_dim, kl per site, log p(x_k), nll, gap, error and estimator by quadrature (nats).

    Raises ValueError for more than two scalar latents (use analysis.iwae)."""
    dens = Densities(model, guide, data)
    draws = dens.samples()
    u_name, v_name = dens.bottom, dens.other
    u_q, u_p = draws["q:" + u_name], draws["p:" + u_name]
    lo, hi = zip(*[sample_range(torch.stack([u_q[:, k], u_p[:, k]], 1)) for k in range(2)])
    lo, hi = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    if v_name is None:
        inner = Direct(dens, u_name)
        describe = "1-D"
    else:
        vlo, vhi = sample_range(torch.cat([draws["q:" + v_name], draws["p:" + v_name]]))
        inner = Inner(dens, u_name, v_name, vlo, vhi)
        describe = "2-D"
    # the evidence shift: the largest log joint among the prior draws, per data point
    ll = draws["p:loglik"].reshape(-1, 2)
    ref = ll.amax(0)
    quant = LossQuantities(dens, inner, ref)
    outer = Outer(dens, quant, quant, tol)
    for attempt in range(4):
        panels, est = outer.run(_initial_breaks([u_q, u_p], lo, hi), level=0)
        ok = _edge_ok(panels, est, "Zq") and _edge_ok(panels, est, "Zp")
        if ok or attempt == 3:
            break
        width = hi - lo
        lo, hi = lo - width, hi + width
    result = _summarise(dens, est, ref)
    level, error = 0, math.inf
    for _ in range(3):
        fine_panels = _split_all(panels)
        fine = outer.evaluate(fine_panels, level + 1)
        fine_result = _summarise(dens, fine, ref)
        error = max(abs(a - b) for a, b in zip(_numbers(result), _numbers(fine_result)))
        panels, est, result, level = fine_panels, fine, fine_result, level + 1
        if error < tol:
            break
    w = dens.w
    nodes = panels.shape[0] * 15
    result.update({
        "recon_per_dim": result["recon"] / data.n,
        "gap": result["loss"] - result["nll"],
        "error": error,
        "estimator": (f"exact quadrature ({describe}: adaptive Gauss-Kronrod 15 in {u_name}, {nodes} nodes per data "
                      "point" + (f"; per node, feature-adapted Gauss-Legendre in {v_name}" if v_name else "")
                      + f"; error = change under refinement, {error:.1e})"),
    })
    return result


class SurgeryQuantities:
    """Integrands of ELBO surgery on one shared grid of the top latent t: q_k(t), q_k log(q_k / p),
    q_k log(q_k / q_agg) and q_agg log(q_agg / p), with q_agg = sum_k w_k q_k."""

    def __init__(self, dens: Densities, inner, top, other):
        self.d, self.inner, self.top, self.other = dens, inner, top, other

    def __call__(self, t, level):
        lq = self.inner(t, level)["lq"]  # log q(t|x_k)
        vals = {self.top: t[:, :1].expand(-1, 2)}
        if self.other is not None:
            vals[self.other] = torch.zeros(1, 2, dtype=torch.float64)
        lp = self.d.logs(vals, ("p",))["p:" + self.top].expand_as(lq)
        lagg = _lse(lq + self.d.w.log(), 1)[:, None].expand_as(lq)
        q, agg = lq.exp(), lagg.exp()

        def xlog(a, b):
            return torch.where(a > 0, a * b, torch.zeros_like(a))

        return {"Zq": q, "KL": xlog(q, lq - lp), "MI": xlog(q, lq - lagg), "KLagg": xlog(agg, lagg - lp)}

    def errors(self, est):
        w = self.d.w
        d = {k: (K - G).abs() for k, (K, G) in est.items()}
        return torch.stack([d["Zq"], w * d["KL"], w * d["MI"], d["KLagg"]]).amax(0)


def _surgery_numbers(dens, est):
    tot = {k: K.sum(0) for k, (K, G) in est.items()}
    w = dens.w
    avg, mi, agg = float((w * tot["KL"]).sum()), float((w * tot["MI"]).sum()), float(tot["KLagg"][0])
    return {"avg_kl": avg, "mutual_info": mi, "marginal_kl": agg, "residual": avg - mi - agg,
            "kl_per_point": [float(v) for v in tot["KL"]], "q_mass": [float(v) for v in tot["Zq"]]}


def surgery(model, guide, data, tol: float = 1e-4) -> dict:
    """ELBO surgery for the top latent t (z, or z2 of the DLGM): avg_kl = sum_k w_k KL(q(t|x_k) || p(t)) splits
    into mutual_info I_q(x; t) plus marginal_kl KL(q(t) || p(t)); also residual, entropy H(w), error, estimator.

    q(t|x_k) is the guide's marginal (for the DLGM with the structured guide, the integral of q(z1|x) q(z2|z1) over
    z1), computed on a grid of t shared by both data points, so the identity holds node by node."""
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
    panels, est = outer.run(_initial_breaks([every], lo_t, hi_t), level=0)
    result, level, error = _surgery_numbers(dens, est), 0, math.inf
    for _ in range(3):
        fine_panels = _split_all(panels)
        fine = outer.evaluate(fine_panels, level + 1)
        fine_result = _surgery_numbers(dens, fine)
        error = max(abs(fine_result[k] - result[k]) for k in ("avg_kl", "mutual_info", "marginal_kl"))
        panels, est, result, level = fine_panels, fine, fine_result, level + 1
        if error < tol:
            break
    result.update({"site": top, "entropy": data.entropy, "error": error,
                   "estimator": f"exact quadrature (adaptive Gauss-Kronrod 15 in {top}, {panels.shape[0] * 15} nodes"
                                + (f"; q({top}|x) by feature-adapted Gauss-Legendre over {other}" if other else "")
                                + f"; error = change under refinement, {error:.1e})"})
    return result


def _weighted_quantiles(values, logw, probs):
    """Quantiles of values (S,) under normalised weights exp(logw) (S,)."""
    order = values.argsort()
    v, w = values[order], (logw[order] - logw.max()).exp()
    cdf = w.cumsum(0) / w.sum()
    idx = torch.searchsorted(cdf, torch.tensor(probs, dtype=cdf.dtype)).clamp(max=len(v) - 1)
    return v[idx]


def posterior_grid(model, guide, data, points: int = 201, log_px=None) -> dict:
    """Per latent site, numpy arrays on a regular grid: 'grid' (N,), 'prior' p(site) (N,) (for z1 of the DLGM the
    learned marginal), 'q' q(site|x_k) (2, N), 'q_aggregate' sum_k w_k q(site|x_k) (N,) and 'posterior'
    p(site|x_k) (2, N). Also 'weights', 'log_px' (from exact() unless given) and 'checks' (grid masses)."""
    dens = Densities(model, guide, data)
    draws = dens.samples()
    if log_px is None:
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
            out["checks"][f"p({other}|{site}) mass on the {other} grid (min, max)"] = (mass.min(), mass.max())
        post = (lp - log_px).exp()
        step = float(grid[1] - grid[0])
        out["checks"][f"{site}: trapezoid mass of q(.|x_k), posterior"] = (
            (lq.exp().sum(0) * step).numpy(), (post.sum(0) * step).numpy())
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
    logs = dens.logs({bottom: nodes[:, None, None].expand(-1, 1, 2), top: t[None]}, ("p",))
    lcond = logs["p:" + bottom].expand(len(nodes), len(grid), 2)
    llik = sum(logs["p:" + n] for n in dens.observed).expand_as(lcond)
    lprior = logs["p:" + top].expand_as(lcond)[0]
    lp = lprior + _lse(lw[:, None, None] + lcond + llik, 0)
    mass = _lse(lw[:, None, None] + lcond, 0).exp()[:, 0]
    return lp, lprior, mass
