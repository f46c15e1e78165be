"""Exact evaluation by deterministic quadrature for models with at most two scalar latents (VAE d=1 and d=2, DLGM 2x1).

Public: exact() (loss terms, log p(x_k), NLL, gap), surgery() (ELBO surgery of the top latent), evidence() (log p(x_k)
of the model alone) and posterior_grid() (prior, q, aggregate q and true posterior marginals on regular grids, for
plots). Each refuses bad input before any work, in one line (ValueError naming the problem; check_call): tol or points
out of range, data that are not OneBit, a model or guide built for another n, a guide whose sites, shapes, plates,
support or density do not fit the model (infer.fit.check_inputs, as analysis.report.evaluate).

Modules, one job each: analysis.quadrature (the Gauss-Kronrod rule, the outer adaptation in u and the refinement),
analysis.densities (site log-densities on grids, the joint guide's marginals, the input checks), analysis.seeding
(the inner panels seeded at the features in v), analysis.inner (the adaptive inner integrals), analysis.flowbreaks
(where a flow guide's map is not smooth, in its base noise), analysis.precision (float64 copies of float32
networks, so that no node is rounded to float32), analysis.evidence
(evidence()), analysis.surgery (surgery(); analysis.split_surgery for one site of two scalars), analysis.coordinates
(the scalars integrated), analysis.posterior (posterior_grid()); this one holds exact() and
re-exports the other three public functions.

Every density comes from tracing the model and the guide under `poutine.condition` on grids of latent values, so
any guide that samples the model's latent sites works. Names: u is the model's bottom latent (the parent of x: z
of the VAE, z1 of the DLGM) and v the other one (z2). One site of two scalars (the VAE at latent_dim=2) is split
into its coordinates (analysis.coordinates): u = z[1], v = z[0], fed to the model and guide stacked as the site's
event; its likelihood p(x|u, v) depends on both, so its decoder runs on every (u, v) node (chunked to
densities.SPLIT_ELEMENTS, with a coarser feature grid, seeding.SPLIT_LOCATE_POINTS). Integrals run over u outside
and v inside:

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
grid. It is smooth only between the spline's knots and division points, so those, mapped back to eps
(analysis.flowbreaks), are initial breakpoints: no panel straddles one. The evidence p(x, u) is integrated in u,
where it is smooth.

Densities are float64 where it matters: the model's Bernoulli likelihood and the Normal sites are evaluated from
float64 parameters (qdensity.log_prob64; float32 cancels a 0-bit's log-probability to 0 for logits <= -15). Model
evaluations are chunked so that no per-bit tensor exceeds MAX_ELEMENTS elements, whatever n.

Everything is summed in log space with per-row shifts. Accuracy is proven by refinement: the result is recomputed
with every u panel split in two (end panels where every integrand is below 1e-30 of its total are dropped first),
every seeded v panel split in two and a 10x tighter inner tolerance, and the largest change among the reported numbers
is the error (repeated, up to 3 times, until it is below tol); every reported number counts, per data point as
well. The refined numbers are returned. tests/test_quadrature_accuracy.py checks the error against an independent
float64 evaluation of trained runs at n = 1000.
"""
import torch

from infer.runtime import flush_denormals

from .densities import MARGINAL_PANELS, MASS_TOLERANCE, Densities, check_call, sample_range
from .precision import in_float64, on_parameter_dtype
from .evidence import EvidenceQuantities, evidence, evidence_setup
from .flowbreaks import flow_breaks
from .inner import Direct, Inner
from .posterior import posterior_grid
from .base_noise import BaseNoise
from .quadrature import Joined, Outer, adapt, initial_breaks, refine
from .surgery import surgery

__all__ = ["evidence", "exact", "posterior_grid", "surgery"]


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


class NotADensity(ValueError):
    """The quadrature's refusal of a guide whose q(z|x_k) does not integrate to 1 on its grid: its log_prob is no
    density (off by a constant), or one the grid cannot integrate."""


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
    """Initial breakpoints (NB, 2) in the base noise of the bottom site: quantiles of its draws (fixed seed) and the
    points where the flow's map is not smooth (flowbreaks.flow_breaks: a spline's knots and division points, mapped
    back to eps), so that no panel straddles one."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        eps = dens.base.sample(count, 2)
    lo, hi = (torch.tensor(v, dtype=torch.float64) for v in zip(*[sample_range(eps[:, k]) for k in range(2)]))
    return torch.cat([initial_breaks([eps], lo, hi), flow_breaks(dens.base, lo, hi)]).sort(0).values


@flush_denormals()
@in_float64
@on_parameter_dtype
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
    scalar latents per data point, and for a joint guide over two (use analysis.iwae.iwae then)."""
    check_call(model, guide, data, tol=tol)
    dens = Densities(model, guide, data)
    u_name, v_name = dens.bottom, dens.other
    if dens.base is None:
        inner, breaks, ref, describe = evidence_setup(dens, ("q", "p"))
        quant = LossQuantities(dens, inner, ref)
        outer = Outer(dens, quant, quant, tol)
        panels, est = adapt(outer, breaks)
    else:  # a flow guide: the expectations under q in its base noise, the evidence in u
        inner_p, breaks_p, ref, describe = evidence_setup(dens, ("p",))
        evidence_quant = EvidenceQuantities(dens, inner_p, ref)
        evidence_outer = Outer(dens, evidence_quant, evidence_quant, tol)
        q_quant = LossQuantities(dens, *_base_setup(dens), ref, dens.base)
        q_outer = Outer(dens, q_quant, q_quant, tol)
        panels_q, est = adapt(q_outer, _base_breaks(dens))
        panels_p, est_p = adapt(evidence_outer, breaks_p)
        outer, panels = Joined(q_outer, evidence_outer), (panels_q, panels_p)
        est.update(est_p)
    result = _summarise(dens, est, ref)
    mass = result["per_point"]["q_mass"]
    if any(abs(m - 1) > MASS_TOLERANCE for m in mass):
        raise NotADensity(f"q(z|x_k) integrates to {[round(m, 4) for m in mass]} on the quadrature grid, not 1: the "
                         "guide's log_prob is not the log-density of the law of its draws (off by a constant, it "
                         "integrates to e^c), or its density is one this grid cannot integrate (a point mass such as "
                         "AutoDelta or AutoLaplaceApproximation)")
    panels, est, result, error = refine(outer, panels, result, lambda e: _summarise(dens, e, ref), _numbers, tol, est)
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
