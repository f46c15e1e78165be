"""ClosedFormELBO: the ELBO over traced model and guide, with every valid closed form taken exactly."""
from collections import OrderedDict

import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.infer import ELBO
from pyro.infer.inspect import get_dependencies
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from .noise import SobolNoise
from .validate import NOISE, check
LATTICE_HALF_WIDTH = 8.0  # the lattice covers eps in [-8, 8]: the mass outside is 1e-15


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
    (randomised quasi-Monte Carlo: unbiased, lower variance); "lattice" does the same but spreads the first
    Gaussian site's particles on a randomly shifted grid over [-8, 8] sigma with weights phi (a randomised
    quadrature rule that sees the tails every step); "mc" uses plain pseudo-random draws.

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

    def objective_of_means(self, names, means: torch.Tensor) -> torch.Tensor:
        """The objective from the particle means of the terms (a (T,) tensor, in the order of `names`)."""
        if not self.free_bits:
            return means.sum()
        floor = torch.tensor([name in self._sites for name in names], device=means.device)  # not an auxiliary
        return torch.where(floor, means.clamp_min(self.free_bits), means).sum()

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
