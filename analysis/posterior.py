"""Exact densities on regular grids, for plots: prior, q(.|x_k), aggregate q and the true posterior p(.|x_k).

The true posterior is p(x_k, site) / p(x_k), with log p(x_k) from analysis.exact.exact() unless given; the grids'
trapezoid masses are returned as checks. For one site of two scalars each coordinate gets its marginals (the other
coordinate integrated, the likelihood with it). For the top latent of the DLGM, p(x_k, t) integrates the bottom
latent on one shared Gauss-Legendre grid fine enough for the narrowest p(u|t).
"""
import math

import numpy as np
import torch
from pyro import poutine

from infer.runtime import flush_denormals

from .densities import Densities, check_call, sample_range
from .precision import on_parameter_dtype
from .inner import Direct, Inner
from .quadrature import lse


def _weighted_quantiles(values, logw, probs):
    """Quantiles of values (S,) under normalised weights exp(logw) (S,)."""
    order = values.argsort()
    v, w = values[order], (logw[order] - logw.max()).exp()
    cdf = w.cumsum(0) / w.sum()
    idx = torch.searchsorted(cdf, torch.tensor(probs, dtype=cdf.dtype)).clamp(max=len(v) - 1)
    return v[idx]


@flush_denormals()
@on_parameter_dtype
def posterior_grid(model, guide, data, points: int = 201, log_px=None) -> dict:
    """Per latent site (for one site of 2 scalars, per coordinate 'site[0]', 'site[1]': the marginals), numpy arrays
    on a regular grid: 'grid' (N,), 'prior' p(site) (N,) (for z1 of the DLGM the learned marginal), 'q' q(site|x_k)
    (2, N), 'q_aggregate' sum_k w_k q(site|x_k) (N,) and 'posterior' p(site|x_k) (2, N). Also 'weights', 'log_px'
    (from exact() unless given) and 'checks' (grid masses)."""
    check_call(model, guide, data, points=points)
    dens = Densities(model, guide, data)
    draws = dens.samples()
    if log_px is None:
        from infer.checks import inputs_checked

        from .exact import exact  # imported here: analysis.exact imports this module

        with inputs_checked(model, guide, data):  # checked above
            log_px = exact(model, guide, data)["log_px"]
    log_px = torch.tensor(log_px, dtype=torch.float64)
    w = dens.w
    out = {"weights": w.numpy(), "log_px": log_px.numpy(), "checks": {}}
    loglik = draws["p:loglik"].reshape(-1, 2)
    split = dens.coords.split
    for site in dens.coords.names:  # the sites, or the two coordinates of a split site (marginals)
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
        elif split is not None:  # p(x|z) depends on both coordinates: the likelihood is integrated too
            vlo, vhi = sample_range(torch.cat([draws["q:" + other], draws["p:" + other]]))
            r = Inner(dens, site, other, vlo, vhi)(rows)
            lq, lp = r["lq"], r["lp"]
            lprior = _coordinate_prior(dens, split, dens.coords.names.index(site), rows)
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


def _coordinate_prior(dens, site: str, k: int, rows) -> torch.Tensor:
    """log p(z_k) at rows (N, 2) for coordinate k of a site whose prior is a diagonal Normal (possibly Independent):
    its marginal N(loc_k, scale_k^2); ValueError for any other prior (its marginal would be an integral)."""
    vals = dens.fed({name: torch.zeros(1, 2, dtype=torch.float64) for name in dens.coords.names})
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(poutine.condition(dens.model, data=vals)).get_trace(dens.x)
    fn = tr.nodes[site]["fn"]
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    if not isinstance(fn, torch.distributions.Normal):
        raise ValueError(f"the prior of {site} is a {type(fn).__name__}, not a diagonal Normal: the marginal of each "
                         "coordinate, which the posterior figure plots, is not implemented for it")
    loc, scale = (dens.back(t.expand(tr.nodes[site]["value"].shape)[..., k]).reshape(-1, 2) for t in (fn.loc, fn.scale))
    return -0.5 * ((rows - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)


def _gauss_legendre(m: int):
    """Gauss-Legendre nodes and weights on [-1, 1], float64 tensors."""
    x, w = np.polynomial.legendre.leggauss(m)
    return torch.tensor(x), torch.tensor(w)


def _top_joint(dens, top, bottom, grid, ulo, uhi, max_nodes=20000):
    """log p(x_k, t), log p(t) on grid (N,) for the top latent t, integrating the bottom latent u over one shared
    Gauss-Legendre grid fine enough for the narrowest p(u|t) (so the decoder runs once per u node); also the mass
    of p(u|t) on that grid per t (should be 1)."""
    t = grid[:, None].expand(-1, 2)
    probe = {top: t, bottom: torch.zeros(1, 2, dtype=torch.float64)}
    vals = dens.fed(probe)
    with torch.no_grad(), poutine.block():
        tr = poutine.trace(poutine.condition(dens.model, data=vals)).get_trace(dens.x)
    fn = tr.nodes[bottom]["fn"]
    try:
        mean, sd = dens.back(fn.mean).reshape(-1), dens.back(fn.stddev).reshape(-1)
        ulo, uhi = min(ulo, float((mean - 12 * sd).min())), max(uhi, float((mean + 12 * sd).max()))
        panel = float(sd.min()) / 2
    except NotImplementedError:
        panel = (uhi - ulo) / 2000
    if not all(math.isfinite(v) for v in (ulo, uhi, panel)) or panel <= 0:
        raise ValueError(f"the {bottom} grid of the posterior figure is not finite (p({bottom}|{top}) spans "
                         f"[{ulo:g}, {uhi:g}], panels of {panel:g})")
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
    lp = lprior + lse(lw[:, None, None] + lcond + llik, 0)
    mass = lse(lw[:, None, None] + lcond, 0).exp()[:, 0]
    return lp, lprior, mass
