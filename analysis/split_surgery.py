"""ELBO surgery of one latent site of two scalars (a split site, analysis.coordinates: the VAE at latent_dim=2).

Every surgery term is an expectation under q(z|x_k) of log-densities at z: KL_k = E_qk[log q_k - log p],
MI_k = E_qk[log q_k - log q_agg] and KLagg_k = E_qk[log q_agg - log p], with q_agg(z) = sum_j w_j q(z|x_j) read at
each point's own nodes (the guide also evaluated at the other point's data). So each point integrates over its own
2-D grid (u = z[1] outside, v = z[0] inside, as exact() does), avg_kl = MI + KLagg holds node by node, and the
decoder never runs: the prior of a lone site depends on no other latent.
"""
import torch
from pyro import poutine

from .densities import MASS_TOLERANCE, Densities, sample_range
from .inner import Inner
from .qdensity import log_prob64
from .quadrature import Outer, adapt, initial_breaks, refine


class SplitSurgeryDensities:
    """A Densities (dens, whose every other attribute it passes through) whose logs() gives, at coordinate values,
    'q:<site>' = log q(z|x_k), 's:prior' = log p(z) and 's:agg' = log q_agg(z), each at point k's own value z_k
    (float64 (..., 2)): the densities analysis.inner.Inner averages under q for ELBO surgery of a split site."""

    def __init__(self, dens: Densities):
        self.d, self.site, self.logw = dens, dens.coords.split, dens.w.log()
        vals = dens.fed({n: torch.zeros(1, 2, dtype=torch.float64) for n in dens.coords.names})
        with torch.no_grad(), poutine.block():
            self.prior = poutine.trace(poutine.condition(dens.model, data=vals)).get_trace(dens.x).nodes[self.site]

    def __getattr__(self, name):
        return getattr(self.d, name)

    def logs(self, values: dict, parts=("q",)) -> dict:
        """{'q:<site>', 's:prior', 's:agg'}: float64 log-densities (..., 2) at coordinate values {name: (..., 2)}."""
        z = self.d.fed(values)[self.site]  # (..., 2 points, 2)
        with torch.no_grad(), poutine.block():
            own = self.d.back(self.d.q.log_prob({self.site: z})[self.site])
            # the guide at the other point's data: log q(z_k|x_{1-k}), flipped back to point k
            other = self.d.back(self.d.q.log_prob({self.site: z.flip(-2)})[self.site]).flip(-1)
            prior = self.d.back(log_prob64({"fn": self.prior["fn"], "value": z}))
        agg = torch.logaddexp(own + self.logw, other + self.logw.flip(0))
        return {"q:" + self.site: own, "s:prior": prior, "s:agg": agg}


class SplitSurgeryQuantities:
    """Per u node and data point: 'Zq' = q_k(u) (v integrated), and q_k(u) times the conditional means of
    log q_k - log p ('KL'), log q_k - log q_agg ('MI') and log q_agg - log p ('KLagg')."""

    def __init__(self, dens: SplitSurgeryDensities, inner: Inner):
        self.d, self.inner = dens, inner

    def __call__(self, u, level):
        r = self.inner(u, level)
        q, mean = r["lq"].exp(), r["mean"]
        lq = mean["q:" + self.d.site]

        def times_q(t):
            return torch.where(q > 0, q * t, torch.zeros_like(q))

        return {"Zq": q, "KL": times_q(lq - mean["s:prior"]), "MI": times_q(lq - mean["s:agg"]),
                "KLagg": times_q(mean["s:agg"] - mean["s:prior"])}

    def errors(self, est):
        """Per panel and data point, the largest |K15 - G7| difference of the surgery integrals (nats)."""
        w = self.d.w
        d = {k: (K - G).abs() for k, (K, G) in est.items()}
        return torch.stack([d["Zq"], w * d["KL"], w * d["MI"], w * d["KLagg"]]).amax(0)


def _numbers(w, est) -> dict:
    """avg_kl, mutual_info, marginal_kl, residual and per-point KL and q mass from per-panel Kronrod estimates."""
    tot = {k: K.sum(0) for k, (K, G) in est.items()}
    avg, mi, agg = (float((w * tot[k]).sum()) for k in ("KL", "MI", "KLagg"))
    return {"avg_kl": avg, "mutual_info": mi, "marginal_kl": agg, "residual": avg - mi - agg,
            "kl_per_point": [float(v) for v in tot["KL"]], "q_mass": [float(v) for v in tot["Zq"]]}


def split_surgery(dens: Densities, data, tol: float) -> dict:
    """surgery()'s result for a split site (dens.coords.split): avg_kl, mutual_info, marginal_kl, residual,
    kl_per_point, q_mass, site, entropy, error and estimator. ValueError where q(z|x_k) does not integrate to 1."""
    site, u, v = dens.coords.split, dens.bottom, dens.other
    split = SplitSurgeryDensities(dens)
    draws = dens.samples()
    vlo, vhi = sample_range(torch.cat([draws["q:" + v], draws["p:" + v]]))
    quant = SplitSurgeryQuantities(split, Inner(split, u, v, vlo, vhi, ("q",)))
    outer = Outer(dens, quant, quant, tol)
    u_q, u_p = draws["q:" + u], draws["p:" + u]
    lo, hi = (torch.tensor(b, dtype=torch.float64) for b in zip(*[sample_range(torch.stack([u_q[:, k], u_p[:, k]], 1))
                                                                   for k in range(2)]))
    panels, est = adapt(outer, initial_breaks([u_q], lo, hi))
    mass = _numbers(dens.w, est)["q_mass"]
    if any(abs(m - 1) > MASS_TOLERANCE for m in mass):
        raise ValueError(f"q({site}|x_k) integrates to {[round(m, 4) for m in mass]} on the surgery's grid, not 1: "
                         "no ELBO surgery")
    keys = ("avg_kl", "mutual_info", "marginal_kl")
    panels, est, result, error = refine(outer, panels, _numbers(dens.w, est), lambda e: _numbers(dens.w, e),
                                        lambda r: [r[k] for k in keys] + r["kl_per_point"], tol, est)
    result.update({"site": site, "entropy": data.entropy, "error": error,
                   "estimator": f"exact quadrature (2-D: adaptive Gauss-Kronrod 15 in {u}, {panels.shape[0] * 15} "
                                f"nodes per data point; per node, adaptive Gauss-Kronrod 15 in {v}; q({site}) = "
                                f"sum_k w_k q({site}|x_k) at each node; error = change under refinement, {error:.1e})"})
    return result
