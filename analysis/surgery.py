"""ELBO surgery of the top latent t by quadrature: avg KL(q(t|x_k) || p(t)) = I_q(x; t) + KL(q(t) || p(t)).

q(t|x_k) is the guide's marginal (an inner integral over the other latent where there is one), on one grid of t
shared by both data points, so the identity holds node by node. One site of two scalars is analysis.split_surgery's.
"""
import torch

from infer.runtime import flush_denormals

from .densities import MASS_TOLERANCE, Densities, check_call, sample_range
from .precision import in_float64, on_parameter_dtype
from .inner import Direct, Inner
from .quadrature import Outer, adapt, initial_breaks, lse, refine
from .split_surgery import split_surgery


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
        lagg = lse(lq + self.d.w.log(), 1)[:, None].expand_as(lq)
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
@in_float64
@on_parameter_dtype
def surgery(model, guide, data, tol: float = 1e-4) -> dict:
    """ELBO surgery for the top latent t (z, or z2 of the DLGM): avg_kl = sum_k w_k KL(q(t|x_k) || p(t)) splits
    into mutual_info I_q(x; t) plus marginal_kl KL(q(t) || p(t)); also residual, entropy H(w), error, estimator.

    q(t|x_k) is the guide's marginal (for the DLGM with the structured guide, the integral of q(z1|x) q(z2|z1) over
    z1), computed on a grid of t shared by both data points, so the identity holds node by node. Raises ValueError
    where q(t|x_k) does not integrate to 1 on that grid (its numbers would mean nothing). For a joint guide
    q(t|x_k) is its marginal, so avg_kl is the marginals' average KL: exact()'s KL is larger by its
    total_correlation_per_point."""
    check_call(model, guide, data, tol=tol)
    dens = Densities(model, guide, data)
    if dens.coords.split is not None:  # one site of 2 scalars: each point on its own 2-D grid
        return split_surgery(dens, data, tol)
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
    panels, est = adapt(outer, initial_breaks([every], lo_t, hi_t, narrow=own), ("Zq", "KLagg"))
    keys = ("avg_kl", "mutual_info", "marginal_kl")
    mass = _surgery_numbers(dens, est)["q_mass"]
    if any(abs(m - 1) > MASS_TOLERANCE for m in mass):
        raise ValueError(f"q({top}|x_k) integrates to {[round(m, 4) for m in mass]} on the surgery's grid of {top}, "
                         "not 1: no ELBO surgery")
    panels, est, result, error = refine(outer, panels, _surgery_numbers(dens, est),
                                        lambda e: _surgery_numbers(dens, e), lambda r: [r[k] for k in keys], tol, est)
    result.update({"site": top, "entropy": data.entropy, "error": error,
                   "estimator": f"exact quadrature (adaptive Gauss-Kronrod 15 in {top}, {panels.shape[0] * 15} nodes"
                                + (f"; q({top}|x) by adaptive Gauss-Kronrod 15 over {other}" if other else "")
                                + f"; error = change under refinement, {error:.1e})"})
    return result
