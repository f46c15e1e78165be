"""log p(x_k) and the NLL by quadrature of the model alone, and the setup of the integrals over the bottom latent.

evidence_setup gives the inner integral, first breakpoints and log-shift of an integral in u (the parent of x) with
the other latent integrated inside; exact() and evidence() share it. The guide's draws only place breakpoints, so
evidence() works for any guide, also one whose own density quadrature cannot integrate (a joint guide on the DLGM).
"""
import torch

from infer.runtime import flush_denormals

from .densities import Densities, check_call, sample_range
from .precision import in_float64, on_parameter_dtype
from .inner import Direct, Inner
from .quadrature import Outer, adapt, initial_breaks, refine


def evidence_setup(dens: Densities, parts) -> tuple:
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
    return inner, initial_breaks([u_q, u_p], lo, hi), draws["p:loglik"].reshape(-1, 2).amax(0), describe


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
@in_float64
@on_parameter_dtype
def evidence(model, guide, data, tol: float = 1e-4) -> dict:
    """log p(x_k) and the NLL by quadrature of the model alone, in nats per data point: {log_px, nll, error,
    estimator}. The guide only places the first breakpoints (its draws sit near the posterior), so this works for
    any guide, also one whose own density quadrature cannot integrate (a joint guide on the DLGM)."""
    check_call(model, guide, data, tol=tol)
    dens = Densities(model, guide, data, need_q=False)
    inner, breaks, ref, describe = evidence_setup(dens, ("p",))
    quant = EvidenceQuantities(dens, inner, ref)
    outer = Outer(dens, quant, quant, tol)
    panels, est = adapt(outer, breaks, ("Zp",))

    def summarise(e):
        log_px = e["Zp"][0].sum(0).log() + ref
        return {"log_px": [float(v) for v in log_px], "nll": float(-(dens.w * log_px).sum())}

    panels, est, result, error = refine(outer, panels, summarise(est), summarise, lambda r: r["log_px"], tol, est)
    result.update({"error": error, "estimator": f"exact quadrature of the model alone ({describe} in "
                   f"{', '.join(dens.latents)}, {panels.shape[0] * 15} nodes per data point in {dens.bottom}; "
                   f"error = change under refinement, {error:.1e})"})
    return result
