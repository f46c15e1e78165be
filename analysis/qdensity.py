"""log q(z|x) of a guide at given values of the model's latent sites, read through poutine.condition.

Three kinds of guide, told apart from one trace:

* ``direct``: the guide samples the model's latent sites themselves (our guides, a user's guide); condition them.
* ``per_site``: every latent site ``s`` is a Delta of an auxiliary ``s_unconstrained`` in the same plates
  (Pyro's AutoNormal); condition the auxiliary at biject_to(support).inv(value). q factorises over data points.
* ``joint``: one auxiliary latent outside the data plate packs every site of every data point (Pyro's
  AutoContinuous guides: AutoIAFNormal, AutoMultivariateNormal, ...); condition it at the packed unconstrained
  values. q couples the data points, so it has a joint density only: q(z|x_k) is a marginal of it.

Every conditioned trace is checked: the latent sites must come out at the requested values, or the guide is not
one of these kinds and ValueError says so.
"""
import math

import pyro.distributions
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.poutine.util import site_is_subsample

from guides.check import DATA_PLATE, plates

KINDS = ("direct", "per_site", "joint")
def _broadcast_shape(*shapes) -> torch.Size:
    """The broadcast of shapes (torch.broadcast_shapes without its first call's 0.25 s import of torch._refs); a
    ValueError where they do not broadcast."""
    out = []
    for dims in zip(*(tuple(reversed(s)) + (1,) * (max(map(len, shapes)) - len(s)) for s in shapes)):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {', '.join(str(tuple(s)) for s in shapes)} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return torch.Size(reversed(out))


def _sample_sites(trace):
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)}


def _log_prob_float64(fn, value):
    """log fn(value) with fn's parameters in float64, for (Independent wrappers of) the Bernoulli and Normal families;
    None for any other distribution. In float32, torch computes a Bernoulli 0-bit as f + softplus(-f), which cancels
    to exactly 0 for logits f <= -15 (true value -e^f), and a Normal's log(scale) keeps ~1e-7; here log Bernoulli =
    -y softplus(-f) - (1 - y) softplus(f) and log Normal = -(v - m)^2 / 2s^2 - log s - log sqrt(2 pi), in float64."""
    reinterpreted = 0
    while isinstance(fn, torch.distributions.Independent):
        reinterpreted += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if type(fn) in (torch.distributions.Bernoulli, pyro.distributions.Bernoulli):
        f, y = fn.logits.to(torch.float64, copy=True), value.double()
        if bool(((y == 0) | (y == 1)).all()):  # -softplus(-+f), with one temporary of the logits' size
            lp = F.softplus(f.mul_(1 - 2 * y)).neg_()
        else:
            lp = -(y * F.softplus(-f) + (1 - y) * F.softplus(f))
    elif type(fn) in (torch.distributions.Normal, pyro.distributions.Normal):
        loc, scale = fn.loc.double(), fn.scale.double()
        lp = -0.5 * ((value.double() - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)
    else:
        return None
    return lp.sum(tuple(range(-reinterpreted, 0))) if reinterpreted else lp


def log_prob64(site):
    """A site's log-density at its value, evaluated in float64 (the parameters stay float32) when the
    distribution allows it: log p(z1|z2) reaches 1e4 nats in the tails, where float32 keeps only ~1e-3. Bernoulli and
    Normal sites (possibly Independent) are evaluated from float64 parameters, the Bernoulli in the form that does
    not cancel (see _log_prob_float64)."""
    lp = _log_prob_float64(site["fn"], site["value"])
    if lp is not None:
        return lp
    try:
        return _log_prob_anywhere(site["fn"], site["value"].double()).double()
    except (RuntimeError, TypeError, ValueError):
        return _log_prob_anywhere(site["fn"], site["value"]).double()


def _log_prob_anywhere(fn, value):
    """fn.log_prob(value) without torch's argument validation, -inf where value lies outside fn's support: a guide
    with bounded support (a Uniform q) has density 0 there, which quadrature nodes beyond it must read as such, not
    as torch's multi-line support error."""
    layers, layer = [], fn  # fn and the distributions it wraps (Independent, masked, expanded)
    while layer is not None:
        layers.append(layer)
        layer = getattr(layer, "base_dist", None)
    saved = [getattr(layer, "_validate_args", False) for layer in layers]
    try:
        for layer in layers:
            layer._validate_args = False
        lp = fn.log_prob(value)
        try:
            inside = fn.support.check(value)
        except NotImplementedError:  # a dependent support without a check: log_prob's own value stands
            inside = None
    finally:
        for layer, flag in zip(layers, saved):
            layer._validate_args = flag
    if inside is not None and inside.shape == lp.shape:
        lp = torch.where(inside, lp, torch.full_like(lp, -math.inf))
    return lp


def is_joint(guide_trace, model_trace, plate: str = DATA_PLATE) -> bool:
    """True for a joint guide: one that samples an auxiliary site (not a model site) outside the data plate, such
    as an AutoContinuous guide's packed latent, so q couples the data points and has no per-point density."""
    return any(name not in model_trace.nodes and plate not in plates(site)
               for name, site in _sample_sites(guide_trace).items() if not site["is_observed"])


class GuideDensity:
    """The density of `guide` over the latent sites of `model` at data x, for any of the KINDS of guide."""

    def __init__(self, model, guide, x, plate: str = DATA_PLATE):
        self.guide, self.x, self.plate = guide, x, plate
        with torch.no_grad(), torch.random.fork_rng(), poutine.block():  # reading q leaves the RNG as it was
            mt = poutine.trace(model).get_trace(x)
            gt = poutine.trace(guide).get_trace(x)
        self.latents = [n for n, s in _sample_sites(mt).items() if not s["is_observed"]]
        self.supports = {n: mt.nodes[n]["fn"].support for n in self.latents}
        sites = _sample_sites(gt)
        self.aux = [n for n in sites if n not in self.latents]
        missing = [n for n in self.latents if n not in sites]
        if missing:
            raise ValueError(f"the guide does not sample {', '.join(missing)}; its sites are {list(sites)}")
        if not self.aux:
            self.kind = "direct"
        elif all(a.endswith("_unconstrained") and a[:-len("_unconstrained")] in self.latents
                 and plates(sites[a]) == plates(sites[a[:-len("_unconstrained")]]) for a in self.aux) \
                and len(self.aux) == len(self.latents):
            self.kind = "per_site"
        elif is_joint(gt, mt, plate) and isinstance(guide, AutoContinuous) and len(self.aux) == 1:
            self.kind = "joint"
        else:
            raise ValueError(f"the guide samples auxiliary sites {self.aux} that are neither one "
                             "'<site>_unconstrained' per latent site (AutoNormal) nor one joint AutoContinuous latent; "
                             "its density at given latent values cannot be read")

    def _conditioned(self, values: dict):
        """A trace of the guide with its sites conditioned so that the latent sites take `values`."""
        if self.kind == "direct":
            data = values
        elif self.kind == "per_site":
            data = {n + "_unconstrained": biject_to(self.supports[n]).inv(v) for n, v in values.items()}
        else:
            data = {self.aux[0]: self._pack(values)}
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(poutine.condition(self.guide, data=data)).get_trace(self.x)
        for n, v in values.items():
            got = trace.nodes[n]["value"]
            try:
                fits = _broadcast_shape(got.shape, v.shape) == got.shape
            except ValueError:
                fits = False
            if not fits or not torch.allclose(
                    got, v.to(got.dtype).expand_as(got), rtol=1e-4, atol=1e-5):
                raise ValueError(f"conditioning the guide did not put site '{n}' at the requested values "
                                 f"({self.kind} guide); its density cannot be read this way")
        return trace

    def _pack(self, values: dict) -> torch.Tensor:
        """The AutoContinuous latent (batch..., 1, D) that unpacks to `values` (each (batch..., N, *event))."""
        parts = []
        for name, site in self.guide.prototype_trace.iter_stochastic_nodes():
            v = values[name]
            u = biject_to(site["fn"].support).inv(v)
            shape = self.guide._unconstrained_shapes[name]
            plate_dims = site["value"].dim() - site["fn"].event_dim  # Pyro's latent keeps a 1 for each plate dim
            parts.append(u.reshape(u.shape[:u.dim() - len(shape)] + (1,) * plate_dims + (-1,)))
        batch = _broadcast_shape(*[p.shape[:-1] for p in parts])
        return torch.cat([p.expand(batch + p.shape[-1:]) for p in parts], -1)

    def log_prob(self, values: dict) -> dict:
        """{site: log q(site|.) per data point (batch..., N), float64} at `values` {site: (batch..., N, *event)}:
        the guide's own factor for each site (an AutoNormal's auxiliary factor included). Not for joint guides."""
        if self.kind == "joint":
            raise ValueError("a joint guide has no per-site, per-point density; use log_joint")
        trace, out = self._conditioned(values), {}
        for n in self.latents:
            lp = log_prob64(trace.nodes[n])
            if self.kind == "per_site":
                lp = lp + log_prob64(trace.nodes[n + "_unconstrained"])
            out[n] = lp.detach()
        return out

    def log_joint(self, values: dict) -> torch.Tensor:
        """log q(z) summed over all sites and data points (batch...) at `values` {site: (batch..., N, *event)}."""
        trace = self._conditioned(values)
        total = 0.0
        for n, site in _sample_sites(trace).items():
            if n in self.latents or n in self.aux:
                # the data plate is the rightmost batch dim of a latent site; a joint latent keeps a 1 there
                total = total + site["fn"].log_prob(site["value"]).sum(-1)
        return total.detach()
