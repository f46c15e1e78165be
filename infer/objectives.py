"""The training objectives by name, and the check that an objective is valid for a model/guide pair.

    closed_form     ClosedFormELBO: closed-form KL / entropy where valid, the rest sampled (the default)
    elbo            pyro.infer.Trace_ELBO: every term sampled
    meanfield_elbo  pyro.infer.TraceMeanField_ELBO: analytic KL(q(s|.) || p(s|.)) for every latent site; valid only
                    when no model parent of a latent is a guide descendant of it (check_objective refuses otherwise)
    iwae            IWAE: pyro.infer.RenyiELBO(alpha=0) with K = num_particles importance samples per data point
    exact           MarginalLikelihood (infer.marginal): the model's own NLL -sum_k w_k log p(x_k) by a randomised,
                    differentiable quadrature over z (models with at most 2 scalar latents); no guide
                    (needs_guide = False), the model's params only; options nodes (the top latent's lattice, default
                    num_particles) and inner_nodes (the second latent's lattice per top node)

Every ELBO objective trains with infer.fit, with beta / warm-up (LatentScale) on top. Free bits (a per-site KL floor)
need per-site KL terms, which only closed_form computes; the others refuse free_bits > 0.

JitTraceMeanField_ELBO is not offered: in pyro 1.9.2 it re-traces on every step (it caches
`_differentiable_loss` but checks `_loss_and_surrogate_loss`); tests/bench_meanfield_jit.py measures it.
"""
import math

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.inspect import get_dependencies
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from guides.check import DATA_PLATE, plates

from .elbo import NOISE, ClosedFormELBO
from .marginal import MarginalLikelihood, check_marginal

OBJECTIVES = ("closed_form", "elbo", "meanfield_elbo", "iwae", "exact")
MAX_PLATE_NESTING = 1  # the data plate; vectorised particles sit left of it


class ObjectiveError(ValueError):
    """An objective name or option that is not allowed; the message starts with the option's name."""


class IWAE(RenyiELBO):
    """The importance-weighted bound sum_k w_k log (1/K) sum_j p(x_k, z_j) / q(z_j | x_k): RenyiELBO(alpha=0).

    Pyro's RenyiELBO puts data weights (poutine.scale on every site) inside the log-mean-exp, which turns
    w * log-weights into a different bound (alpha = 1 - w). This subclass divides each data point's log-weight by
    its data weight (the scale of the observed sites), takes the log-mean-exp over the K particles per data point,
    and weights the per-point bounds outside it. Any further latent-site scale (beta) stays inside the weights:
    log w = log p(x|z) + beta (log p(z) - log q(z|x)). The guide must be reparameterised (check_guide ensures it),
    so the gradient is the pathwise gradient of the bound."""

    def __init__(self, num_particles: int = 16, max_plate_nesting: int = MAX_PLATE_NESTING,
                 vectorize_particles: bool = True):
        super().__init__(alpha=0, num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles)

    def particle_log_weights(self, model, guide, *args, **kwargs):
        """(log_w, w): the unweighted log importance weights (K, ...data) and the data weights (...data)."""
        log_ws, weight = [], 1.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_w = 0.0
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] == "sample" and not site_is_subsample(site):
                        log_w = log_w + sign * torch_sum(site["log_prob"], sum_dims)
                        if site["is_observed"]:
                            weight = site["scale"]
            log_ws.append(log_w)
        log_w = log_ws[0] if self.vectorize_particles and self.num_particles > 1 else torch.stack(log_ws)
        weight = torch.as_tensor(weight, dtype=log_w.dtype)
        return log_w / weight, weight

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, weight = self.particle_log_weights(model, guide, *args, **kwargs)
        bound = torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
        return -(weight * bound).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())


def make_objective(name: str, num_particles: int, **options):
    """The Pyro ELBO called `name` with `num_particles` vectorised particles per data point (K for iwae).

    options: for closed_form, `closed_form` (bool), `noise` (mc | qmc | lattice) and `free_bits` (>= 0); the Pyro
    objectives draw plain Monte Carlo noise and have no per-site KL terms, so they accept only noise='mc' and
    free_bits=0; exact takes `nodes` (lattice size of the top latent, default num_particles) and `inner_nodes`
    (of the second latent, per top node; default 1) and returns a MarginalLikelihood (no guide).
    Raises ObjectiveError (one line, naming the option) otherwise."""
    if name not in OBJECTIVES:
        raise ObjectiveError(f"name={name!r} is not allowed: the objective must be one of {', '.join(OBJECTIVES)}")
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ObjectiveError(f"num_particles={num_particles!r} is not allowed: it must be an integer >= 1")
    allowed = {"closed_form": {"closed_form", "noise", "free_bits"},
               "exact": {"nodes", "inner_nodes"}}.get(name, {"noise", "free_bits"})
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ObjectiveError(f"{unknown[0]}={options[unknown[0]]!r} is not allowed with objective {name}: "
                             f"its options are {', '.join(sorted(allowed))}")
    if name == "exact":
        try:
            return MarginalLikelihood(nodes=options.get("nodes", num_particles),
                                      inner_nodes=options.get("inner_nodes", 1))
        except ValueError as err:
            raise ObjectiveError(str(err)) from None
    free_bits, noise = options.get("free_bits", 0.0) or 0.0, options.get("noise", "mc")
    if not isinstance(free_bits, (int, float)) or isinstance(free_bits, bool) or not free_bits >= 0:
        raise ObjectiveError(f"free_bits={free_bits!r} is not allowed: it must be a number >= 0")
    if name == "closed_form":
        if noise not in NOISE:
            raise ObjectiveError(f"noise={noise!r} is not allowed: it must be one of {', '.join(NOISE)}")
        return ClosedFormELBO(num_particles=num_particles, closed_form=bool(options.get("closed_form", True)),
                              noise=noise, free_bits=float(free_bits), max_plate_nesting=MAX_PLATE_NESTING)
    if free_bits:
        raise ObjectiveError(f"free_bits={free_bits!r} is not allowed with objective {name}: free bits floor "
                             "per-site KL terms, which only objective closed_form computes (use free_bits=0)")
    if noise != "mc":
        raise ObjectiveError(f"noise={noise!r} is not allowed with objective {name}: Pyro's estimators draw plain "
                             "Monte Carlo noise (use noise=mc, or objective closed_form for qmc/lattice)")
    common = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=MAX_PLATE_NESTING)
    if name == "elbo":
        return Trace_ELBO(**common)
    if name == "meanfield_elbo":
        return TraceMeanField_ELBO(**common)
    return IWAE(**common)


def objective_name(elbo) -> str:
    """The OBJECTIVES name of an ELBO instance (or the name itself); None for other ELBOs."""
    if isinstance(elbo, str):
        return elbo
    for cls, name in ((MarginalLikelihood, "exact"), (ClosedFormELBO, "closed_form"), (IWAE, "iwae"),
                      (TraceMeanField_ELBO, "meanfield_elbo"),
                      (RenyiELBO, "renyi"), (Trace_ELBO, "elbo")):
        if isinstance(elbo, cls):
            return name
    return None


def _closure(deps: dict) -> dict:
    """{site: every site upstream of it} from {site: its direct upstream sites}."""
    up = {s: set(ps) - {s} for s, ps in deps.items()}
    changed = True
    while changed:
        changed = False
        for s, ps in up.items():
            more = set().union(*(up.get(p, set()) for p in ps)) - ps - {s}
            if more:
                ps |= more
                changed = True
    return up


def meanfield_violations(model, guide, x) -> list:
    """[(site, parent)]: latent sites whose model parent is a descendant of them in the guide and whose
    KL(q(site) || p(site | parent)) TraceMeanField_ELBO would take in closed form, which is then biased: Pyro's
    condition for that estimator. Guide descendants come from pyro.infer.inspect.get_dependencies on the guide;
    for sites it does not report (autoguides), every site sampled later in the guide counts as a descendant.
    Sites without a closed-form KL (flows, mixtures, an AutoContinuous guide's Delta sites) are sampled by
    TraceMeanField_ELBO as by Trace_ELBO, so they are exempt."""
    with poutine.block(), pyro.validation_enabled(False):
        parents = {s: set(ps) - {s} for s, ps in get_dependencies(model, (x,))["prior_dependencies"].items()}
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
        try:
            guide_up = _closure(get_dependencies(guide, (x,))["prior_dependencies"])
        except Exception:  # noqa: BLE001  a guide the dependency tracer cannot run: fall back to sampling order
            guide_up = {}
    order = [name for name, site in guide_trace.nodes.items()
             if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)]
    bad = []
    for i, name in enumerate(order):
        if not parents.get(name) or name not in model_trace.nodes or not _closed_form_kl(
                guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]):
            continue
        if name in guide_up:
            descendants = {s for s, up in guide_up.items() if name in up}
        else:
            descendants = set(order[i + 1:])
        bad += [(name, p) for p in order if p in parents[name] & descendants]
    return bad


def _closed_form_kl(q, p) -> bool:
    """Whether TraceMeanField_ELBO takes KL(q || p) in closed form (a Delta q's 'KL' is just -log p(value))."""
    base = q
    while hasattr(base, "base_dist") and not isinstance(base, Delta):
        base = base.base_dist
    if isinstance(base, Delta):
        return False
    try:
        kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True


def check_objective(name, model, guide, x) -> None:
    """Raise ObjectiveError with a one-line reason if objective `name` (or an ELBO instance) is not valid for this
    model and guide on data x: it refuses meanfield_elbo where Pyro's mean-field condition fails, and iwae for a
    guide with a site outside the data plate (a joint guide such as AutoIAFNormal has no per-point weights), and
    exact for a model beyond 2 scalar latents (infer.marginal.check_marginal; the guide is not used and may be None)."""
    name = objective_name(name)
    if name == "exact":
        try:
            check_marginal(model, x)
        except ValueError as err:
            raise ObjectiveError(str(err)) from None
        return
    if name == "iwae":
        with poutine.block(), pyro.validation_enabled(False):
            trace = poutine.trace(guide).get_trace(x)
        joint = [site for site, node in trace.nodes.items() if node["type"] == "sample" and not site_is_subsample(node)
                 and DATA_PLATE not in plates(node)]
        if joint:
            raise ObjectiveError(
                f"objective iwae needs a guide that factorises over the '{DATA_PLATE}' plate (one importance "
                f"weight per data point), but guide site '{joint[0]}' lies outside it (use closed_form or elbo)")
    if name == "meanfield_elbo":
        bad = meanfield_violations(model, guide, x)
        if bad:
            site, parent = bad[0]
            raise ObjectiveError(
                f"objective meanfield_elbo is not valid for this guide: {parent} is a model parent of {site} but a "
                f"guide descendant of it, so TraceMeanField_ELBO's analytic KL(q({site})||p({site}|{parent})) would "
                "be biased (use closed_form or elbo)")


__all__ = ["OBJECTIVES", "IWAE", "MarginalLikelihood", "ObjectiveError", "make_objective", "check_objective",
           "meanfield_violations",
           "objective_name"]
