"""ClosedFormELBO: the ELBO over traced model and guide, with every valid closed form taken exactly."""
from collections import OrderedDict

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.infer import ELBO
from pyro.infer.inspect import get_dependencies
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from .fast_step import StepHandler, weights_summary
from .noise import LATTICE_HALF_WIDTH, SobolNoise
from .plan import traced_step
from .validate import NOISE, check



def _per_particle(term: torch.Tensor, dims: int) -> torch.Tensor:
    """Sum a scaled log-prob tensor over its plate dims, leaving a (particles,) or (1,) tensor."""
    while term.dim() < dims:
        term = term.unsqueeze(0)
    return term.reshape(term.shape[:-dims + 1] + (-1,)).sum(-1) if dims > 1 else term.reshape(1)


def _closed_form(fn, *args):
    """fn(*args), or None where torch/Pyro has no closed form for it (NotImplementedError)."""
    try:
        return fn(*args)
    except NotImplementedError:
        return None


class ClosedFormELBO(ELBO):
    """-ELBO = recon + sum over latent sites of KL_site, estimated per latent site s as follows:

    * KL(q(s|.) || p(s|.)) in closed form when every model parent of s is sampled before s in the guide
      (so the parents are fixed when s is drawn), e.g. p(z) of the VAE and p(z2) of the DLGM;
    * otherwise -H[q(s|.)] in closed form minus a sampled log p(s|parents), e.g. z1 of the DLGM
      with the structured guide, whose model parent z2 is drawn after it;
    * otherwise (no closed-form entropy, e.g. a flow) sampled log q(s|.) - log p(s|parents).

    noise="qmc" draws the noise of Gaussian guide sites from a freshly scrambled Sobol sequence per step
    (randomised quasi-Monte Carlo: unbiased, lower variance); "lattice" spreads the first Gaussian coordinate's
    particles on a randomly shifted grid over [-8, 8] sigma with weights phi (a randomised quadrature rule that
    sees the tails every step) and draws later coordinates from a randomly shifted rank-1 lattice (see
    infer.noise.SobolNoise); "mc" uses plain pseudo-random draws.

    Three ways to compute the same terms: particle_terms (Pyro's trace and replay, any guide), fast_terms (one
    light handler per run; the same draws and arithmetic) and traced_step (fast_terms' forward traced once into a
    graph of tensor ops); infer.fit checks the faster ones against the slower before it trains with them.

    free_bits > 0 floors each site's KL term in the objective (not in the reported terms).

    Auxiliary guide sites (an autoguide's unconstrained or joint latent) give kl_<aux> = log q(aux), folded into
    kl_<site> when the auxiliary is '<site>_unconstrained' (AutoNormal) or the model has one latent site. A
    Delta guide site (an autoguide's model site) gives -log p(site|.) plus its log-density.

    Observed sites give recon = -log p(x|.), always sampled. Scales set by poutine.scale (data weights,
    beta) weight every term. Particles are vectorised. With closed_form=False every term is sampled,
    which is Trace_ELBO for a reparameterised guide.
    """

    def __init__(self, num_particles: int = 1, closed_form: bool = True, max_plate_nesting: int = 1,
                 vectorize_particles: bool = True, noise: str = "mc", free_bits: float = 0.0):
        check("num_particles", num_particles)
        if noise not in NOISE:
            raise ValueError(f"noise={noise!r} is not allowed: noise must be one of {', '.join(NOISE)}")
        if noise != "mc" and not (vectorize_particles and num_particles > 1):
            raise ValueError(f"noise={noise!r} needs vectorised particles with num_particles > 1")
        check("free_bits", free_bits)
        check("closed_form", closed_form)
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles)
        self.closed_form, self.noise, self.free_bits = closed_form, noise, free_bits
        self._dims = max_plate_nesting + 1  # the data plates plus the particle dim left of them
        self._parents = {}
        self._sites = set()  # the kl_<site> terms of model sites: the ones free bits floors

    def _get_trace(self, model, guide, args, kwargs):
        self._noise = None
        if self.noise != "mc":
            self._noise = SobolNoise(self.num_particles, -self._dims,
                                     lattice=LATTICE_HALF_WIDTH if self.noise == "lattice" else 0.0)
            guide = self._noise(guide)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return model_trace, guide_trace

    def model_parents(self, model, args, kwargs) -> dict:
        """{site: set of latent sites its model distribution depends on}, computed once per model."""
        key = id(model)
        if key not in self._parents:
            deps = get_dependencies(model, args, kwargs)["prior_dependencies"]
            self._parents[key] = {site: set(ps) - {site} for site, ps in deps.items()}
        return self._parents[key]

    def particle_terms(self, model, guide, *args, **kwargs) -> "OrderedDict[str, torch.Tensor]":
        """{'recon': (P,), 'kl_<site>': (P,), ...}: each loss term per particle, summed over the weighted data."""
        parents = self.model_parents(model, args, kwargs) if self.closed_form else {}
        terms = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            terms.append(self._terms(model_trace, guide_trace, parents))
            if self._noise is not None and self._noise.log_weights is not None:
                # weighted particles: rescale so that the plain mean over particles is the weighted mean
                factor = self.num_particles * self._noise.log_weights.exp().to(terms[-1]["recon"])
                terms[-1] = OrderedDict((k, v * factor) for k, v in terms[-1].items())
        return OrderedDict((k, torch.cat([t[k] for t in terms])) for k in terms[0])

    def fast_terms(self, model, guide, x, weights, beta: float = 1.0) -> "OrderedDict[str, torch.Tensor]":
        """particle_terms of DataWeights(weights)- and LatentScale(beta)-scaled model and guide on x, through one
        light handler per run (infer.fast_step.StepHandler) instead of Pyro's trace and replay: the same terms, the
        same draws, less Python per step. Needs vectorised particles (num_particles > 1); infer.fit checks it against
        particle_terms once (a golden-value check) and falls back to the general path where they differ."""
        noise = None
        if self.noise != "mc":
            noise = getattr(self, "_fast_noise", None)
            if noise is None:
                noise = self._fast_noise = self._new_noise()
            noise.draw()  # this step's noise; its _pyro_sample is called by StepHandler, not by the stack
        return self._fast_terms(model, guide, x, weights, beta, noise)

    def _new_noise(self):
        return SobolNoise(self.num_particles, -self._dims,
                          lattice=LATTICE_HALF_WIDTH if self.noise == "lattice" else 0.0)

    def _fast_terms(self, model, guide, x, weights, beta, noise):
        """fast_terms with the step's noise already drawn into `noise` (None for plain Monte Carlo draws)."""
        args = (x,)
        parents = self.model_parents(model, args, {}) if self.closed_form else {}
        particles = pyro.plate("num_particles_vectorized", self.num_particles, dim=-self.max_plate_nesting)
        cached = getattr(self, "_weights_summary", None)
        if cached is None or cached[0] is not weights:
            cached = self._weights_summary = (weights, weights_summary(weights))
        summary = cached[1]
        with StepHandler(weights, beta, noise, summary=summary) as guide_run, particles:
            guide(x)
        with StepHandler(weights, beta, None, guide=guide_run.sites, summary=summary) as model_run, particles:
            model(x)
        terms = self._terms(model_run.sites, guide_run.sites, parents)
        self._noise = noise
        if noise is not None and noise.log_weights is not None:
            factor = self.num_particles * noise.log_weights.exp().to(terms["recon"])
            terms = OrderedDict((k, v * factor) for k, v in terms.items())
        return terms

    def traced_step(self, model, guide, x, weights, params=None):
        """The fast path's step traced once into a graph of tensor ops (infer.plan.traced_step): a function
        beta -> (names, means, loss), with `params` also setting their gradients (the joint graph); checked by
        infer.fit against the eager fast path before and while it trains."""
        return traced_step(self, model, guide, x, weights, params)

    def _terms(self, model_trace, guide_trace, parents):
        dims = self._dims
        out = OrderedDict(recon=0.0)
        order = [name for name, site in guide_trace.nodes.items()
                 if site["type"] == "sample" and not site_is_subsample(site)]
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and site["is_observed"]:
                out["recon"] = out["recon"] - _per_particle(site["fn"].log_prob(site["value"]) * site["scale"], dims)
        for name in order:
            q = guide_trace.nodes[name]
            p = model_trace.nodes.get(name)
            if p is None or p["type"] != "sample":  # auxiliary guide site (e.g. an autoguide's joint latent)
                out[f"kl_{name}"] = _per_particle(q["fn"].log_prob(q["value"]) * q["scale"], dims)
                continue
            before = set(order[:order.index(name)])
            term = None
            if self.closed_form and parents.get(name, set()) <= before and not isinstance(q["fn"], Delta):
                term = _closed_form(kl_divergence, q["fn"], p["fn"])
            if term is not None:
                term = term * q["scale"]
            else:
                entropy = _closed_form(q["fn"].entropy) if self.closed_form else None
                log_q = -entropy if entropy is not None else q["fn"].log_prob(q["value"])
                term = log_q * q["scale"] - p["fn"].log_prob(q["value"]) * p["scale"]
            out[f"kl_{name}"] = _per_particle(term, dims)
        if not torch.is_tensor(out["recon"]):  # no observed site: a zero on the device and dtype of the latents
            ref = next(guide_trace.nodes[name]["value"] for name in order) if order else torch.zeros(())
            out["recon"] = ref.new_zeros(1)
        for name in order:  # an AutoNormal-style auxiliary '<site>_unconstrained' belongs to its site's KL
            aux = f"kl_{name}_unconstrained"
            if aux in out and f"kl_{name}" in out:
                out[f"kl_{name}"] = out[f"kl_{name}"] + out.pop(aux)
        sites = [k for k in out if k.startswith("kl_") and k[3:] in model_trace.nodes]
        self._sites = set(sites)
        if len(sites) == 1:  # with one latent site, any other auxiliary (a joint AutoContinuous latent) is its KL
            for k in [k for k in out if k.startswith("kl_") and k not in sites]:
                out[sites[0]] = out[sites[0]] + out.pop(k)
        return out

    def objective(self, terms) -> torch.Tensor:
        """The training objective from particle_terms: recon + sum over sites of max(KL_site, free_bits)
        (free bits: a per-site KL floor; with free_bits = 0 this is -ELBO)."""
        return self.objective_of_means(list(terms), torch.stack([v.mean() for v in terms.values()]))

    def means(self, terms) -> torch.Tensor:
        """The particle means of the terms: a (T,) tensor in the order of `terms` (infer.replicas.ReplicaELBO:
        (T, R))."""
        return torch.stack([t.mean() for t in terms.values()])

    def objective_of_means(self, names, means: torch.Tensor) -> torch.Tensor:
        """The objective from the particle means of the terms (a (T, ...) tensor, in the order of `names`): a
        scalar, or one per replica for (T, R) means."""
        if not self.free_bits:
            return means.sum(0)
        floor = torch.tensor([name in self._sites for name in names], device=means.device)  # not an auxiliary
        floor = floor.reshape((-1,) + (1,) * (means.dim() - 1))
        return torch.where(floor, means.clamp_min(self.free_bits), means).sum(0)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The objective averaged over particles (-ELBO without free bits), differentiable by reparameterisation."""
        return self.objective(self.particle_terms(model, guide, *args, **kwargs))

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss)


__all__ = ["ClosedFormELBO"]
