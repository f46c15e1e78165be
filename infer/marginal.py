"""Training by the exact likelihood: a randomised, differentiable quadrature of log p(x_k) = log int p(x_k, z) dz.

For a model with at most 2 scalar latents (the vae: z; the dlgm: z2 -> z1), the evidence of data point x_k is an
integral over the unit square (or interval) of the latents' prior quantiles:

    p(x_k) = int_[0,1]^L p(x_k | z(u)) du,   z_top = F_top^-1(u_1),   z_next = F_(next | z_top)^-1(u_2),

the inverse-CDF (ancestral) map of the model's prior, read site by site from the model itself through a Pyro handler
(QuantileMessenger: each latent site takes the value fn.icdf(u) of the distribution the model gives it at that
point, the observed 'x' keeps the data). The rule puts u_l on a randomly shifted uniform lattice (j + U) / M_l,
j = 0 .. M_l - 1, with a fresh uniform shift U for every step, every data point and (for the lower latent) every
node of the latent above it, so that

    p_hat(x_k) = mean over the M_1 x M_2 nodes of p(x_k | z(u))

is an unbiased estimate of p(x_k) for every model (each node is uniform on [0,1]^L). Hence -log p_hat is an
upper bound on -log p(x_k) in expectation (Jensen): the training objective cannot drop below the model's true NLL,
and a decoder cannot fit a fixed grid (the trap of deterministic nodes). Its bias is about Var(p_hat) / (2 p^2):
for the integrands here (p(x_k|z) in [0, 1], near-monotone in z) the lattice error is O(1/M_1), so the bias is
O(1/M_1^2), far below the tolerance at M_1 = 256 (measured in tests/test_marginal.py against
analysis.exact.evidence).

Why the quantile map: at n = 1000 the dlgm's z1 sits near +-10 and the map z2 -> z1 becomes steep, so p(z1|z2) is a
needle in z2 and a grid in z1 weighted by densities would miss it; drawing z1 = F^-1(u_2 | z2) given each z2 node
follows the needle by construction, and the pathwise derivative flows into the prior net's loc and scale and into
the decoder. log p(x|z) of a Bernoulli site is taken as -softplus((1 - 2x) f) (exact in float32 for logits
f <= -15, where torch's Bernoulli.log_prob cancels to 0); the log-mean-exp over nodes runs in float64.
"""
import math
from collections import OrderedDict

import torch
from pyro import poutine
from pyro.distributions import Bernoulli, Independent
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.nn import functional as F

MAX_SCALARS = 2  # latent scalars per data point the quadrature integrates


class Unintegrable(ValueError):
    """A model the quadrature cannot integrate, said in one line: a Pyro trace it passes through builds it again
    with its shapes table after a newline, which is left out."""

    def __init__(self, line: str):
        self.line = str(line).split("\n", 1)[0]
        super().__init__(self.line)


class QuantileMessenger(Messenger):
    """Sets every unobserved sample site of a model to the prior quantile fn.icdf(u) of its own distribution.

    The l-th latent site met (l = 0 for the first) gets u of shape (M_l, 1 (x l), 1, 1): its lattice in a new batch
    dim left of the previous ones, so the model's batch shape grows to (M_(L-1), ..., M_0, P) (P = data points). The
    shift of latent l is drawn per node of the latents above it and shared by the data points (the nodes serve every
    data point). Raises ValueError for a latent site beyond MAX_SCALARS scalars per data point, with more than one
    scalar, or without an inverse CDF."""

    def __init__(self, nodes: tuple, generator=None):
        super().__init__()
        self.nodes, self.generator, self.sites, self.shifts = tuple(nodes), generator, [], []

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg) or msg["value"] is not None:
            return
        fn, name, level = msg["fn"], msg["name"], len(self.sites)
        size = math.prod(fn.event_shape)
        scalars = len(self.sites) + size
        if size != 1 or scalars > MAX_SCALARS:
            has = (f"model latent site '{name}' holds {size} (event shape {tuple(fn.event_shape)})" if size != 1 else
                   f"this model has {scalars} latent sites ({', '.join(self.sites + [name])})")
            raise Unintegrable(f"objective exact integrates at most {MAX_SCALARS} scalar latents per data point, one "
                               f"per site; {has} (use an ELBO objective with a guide)")
        count = self.nodes[min(level, len(self.nodes) - 1)]
        above = tuple(self.nodes[:level])[::-1]  # sizes of the lattices of the latents already met
        shift = torch.rand((1, *above, 1, 1), generator=self.generator, dtype=torch.float64)
        j = torch.arange(count, dtype=torch.float64).reshape(count, *([1] * (level + 2)))
        u = ((j + shift) / count).clamp(1e-300, 1.0)  # shift in [0, 1): u in (0, 1]; u = 0 has prob 0
        base = fn.base_dist if isinstance(fn, Independent) else fn
        refusal = Unintegrable(f"model latent site '{name}' has a {type(base).__name__} distribution without an "
                               "inverse CDF; objective exact needs one (Normal, Uniform, ...)")
        if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims != 1:
            raise refusal
        try:
            value = _icdf(base, u)
        except NotImplementedError:  # torch's Distribution.icdf where a family has none
            raise refusal from None
        msg["value"] = value
        msg["is_observed"] = True  # as poutine.condition does: the value is given, not drawn
        self.sites.append(name)
        self.shifts.append(shift)


def _icdf(base, u: torch.Tensor) -> torch.Tensor:
    """base.icdf(u) for u in (0, 1] float64: a Normal's quantile is taken as loc + scale * Phi^-1(u) with Phi^-1 in
    float64 (float32 u rounds to 1 above 1 - 6e-8, which would cut the upper tail at 5.3 sigma); others as they are."""
    if hasattr(base, "loc") and hasattr(base, "scale") and type(base).__name__ == "Normal":
        eps = (math.sqrt(2.0) * torch.special.erfinv(2 * u - 1)).clamp(-38.0, 38.0).to(base.loc)
        return base.loc + base.scale * eps
    return base.icdf(u.to(base.mean))


def log_likelihood(fn, value: torch.Tensor) -> torch.Tensor:
    """fn.log_prob(value), summed over its event dims: a Bernoulli with logits f as -softplus((1 - 2x) f), exact in
    float32 where torch's f + softplus(-f) cancels (0-bits with f <= -15); any other distribution by its log_prob."""
    base, event_dims = (fn.base_dist, fn.reinterpreted_batch_ndims) if isinstance(fn, Independent) else (fn, 0)
    if isinstance(base, Bernoulli) and "logits" in base.__dict__:
        lp = -F.softplus((1 - 2 * value) * base.logits)
        return lp.sum(tuple(range(-event_dims, 0))) if event_dims else lp
    return fn.log_prob(value)


def _quantile_trace(model, x, nodes, generator):
    quantiles = QuantileMessenger(nodes, generator)
    with poutine.block(), quantiles:
        trace = poutine.trace(model).get_trace(x)
    observed = [site for name, site in trace.nodes.items() if site["type"] == "sample"
                and not site_is_subsample(site) and name not in quantiles.sites and site["is_observed"]]
    lattice = tuple(nodes[min(level, len(nodes) - 1)] for level in range(len(quantiles.sites)))[::-1]
    return observed, lattice


def log_evidence_nodes(model, x: torch.Tensor, nodes: tuple, generator=None) -> torch.Tensor:
    """log p(x_k | z(u)) at every lattice node, float64 of shape (M_(L-1), ..., M_0, P).

    The model is traced once under QuantileMessenger on the first data point only (x[..., :1, :]), and each
    observed site's distribution p(x | z(u)) is then evaluated at every data point x_k: one decoder pass per node,
    shared by the data points. Correct when the latents' distributions and the observed site's distribution do not
    depend on which data point is observed (a generative model: x enters only as obs=x); check_marginal verifies
    it against a trace on all data points."""
    observed, lattice = _quantile_trace(model, x[..., :1, :], nodes, generator)
    for site in observed:
        if site["value"].shape != x[..., :1, :].shape:
            raise ValueError(f"observed site '{site['name']}' does not observe the data x (value shape "
                             f"{tuple(site['value'].shape)}); objective exact needs a model that observes x")
    log_lik = sum(log_likelihood(site["fn"], x) for site in observed).double()
    return log_lik.expand(*lattice, x.shape[-2])


def log_evidence(model, x: torch.Tensor, nodes: tuple, generator=None) -> torch.Tensor:
    """log p_hat(x_k), float64 of shape (P,): the log of the lattice mean of p(x_k | z(u)). p_hat(x_k) is an unbiased
    estimate of p(x_k) (randomly shifted lattice in the prior quantiles), so E[log p_hat] <= log p(x_k)."""
    log_lik = log_evidence_nodes(model, x, nodes, generator)
    flat = log_lik.reshape(-1, log_lik.shape[-1])
    return torch.logsumexp(flat, dim=0) - math.log(flat.shape[0])


def latent_scalars(model, x: torch.Tensor) -> dict:
    """{site: scalars per data point} of the model's latent sites, from one trace."""
    with torch.no_grad(), torch.random.fork_rng(), poutine.block():
        trace = poutine.trace(model).get_trace(x)
    points = x.shape[-2]
    return {name: site["value"].numel() // points for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site) and not site["is_observed"]}


def check_marginal(model, x: torch.Tensor) -> None:
    """Raise ValueError (one line) unless the model has at most MAX_SCALARS latent scalars per data point, one per
    site, each with an inverse CDF: the condition for objective exact."""
    sizes = latent_scalars(model, x)
    if sum(sizes.values()) > MAX_SCALARS or any(s != 1 for s in sizes.values()):
        raise ValueError(f"objective exact integrates at most {MAX_SCALARS} scalar latents per data point, one per "
                         f"site; this model has {', '.join(f'{n}: {s}' for n, s in sizes.items())} "
                         "(use an ELBO objective with a guide)")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        shared = log_evidence_nodes(model, x, (3, 2))
        torch.manual_seed(0)
        observed, _ = _quantile_trace(model, x, (3, 2), None)
        direct = sum(log_likelihood(site["fn"], site["value"]) for site in observed).double()
    if not torch.allclose(shared, direct, rtol=1e-5, atol=1e-5):
        raise ValueError("objective exact evaluates p(x_k|z) for every data point from one trace on x_0, but this "
                         "model's densities depend on which data point is observed (its latents' distributions "
                         "must not see the data)")


class MarginalLikelihood:
    """Objective exact: NLL_hat = -sum_k w_k log p_hat(x_k), nats per data point, minimised over the model's params.

    nodes: lattice size M for the first latent met in the model (the top: z of the vae, z2 of the dlgm);
    inner_nodes: for the second (z1 of the dlgm, one lattice of inner_nodes per node of the first).
    p_hat(x_k) is unbiased for p(x_k) with new random shifts every call; E[NLL_hat] >= NLL, the gap is about
    sum_k w_k Var(p_hat(x_k)) / (2 p(x_k)^2). No guide: needs_guide = False."""

    needs_guide = False

    def __init__(self, nodes: int = 256, inner_nodes: int = 8):
        from .validate import check

        check("nodes", nodes)  # the command line's objective.nodes and objective.inner_nodes rules
        check("inner_nodes", inner_nodes)
        self.nodes, self.inner_nodes = nodes, inner_nodes

    def marginal_terms(self, model, data) -> OrderedDict:
        """OrderedDict(nll=tensor of shape (1,)): the differentiable estimate -sum_k w_k log p_hat(x_k) for the raw
        (unweighted) model on data (data.x, data.w), float64."""
        log_px = log_evidence(model, data.x, (self.nodes, self.inner_nodes))
        return OrderedDict(nll=-(data.w.double() * log_px).sum().reshape(1))

    def loss(self, model, data) -> float:
        """The estimate as a float (no gradient)."""
        with torch.no_grad():
            return float(self.marginal_terms(model, data)["nll"])

    def __repr__(self):
        return f"MarginalLikelihood(nodes={self.nodes}, inner_nodes={self.inner_nodes})"


def lattice_evidence(model, data, nodes: int = 1024, inner_nodes: int = 16, replicates: int = 20) -> dict:
    """The model's evidence by the same randomised lattice, finer and repeated: {log_px [per point], nll, nll_se,
    estimator}. nll is the mean over `replicates` independent shifts of -sum_k w_k log p_hat(x_k), nll_se its standard
    error; as p_hat is unbiased, nll is an upper bound on the true NLL in expectation (its bias is about
    Var(p_hat) / 2p^2, below nll_se at these sizes). A cross-check of analysis.exact.evidence where a very steep map
    z2 -> z1 (needles of width 1e-7 in z2) defeats the adaptive quadrature."""
    MarginalLikelihood(nodes, inner_nodes)  # refuses bad sizes in one line
    with torch.no_grad():
        log_px = torch.stack([log_evidence(model, data.x, (nodes, inner_nodes)) for _ in range(replicates)])
        nll = -(data.w.double() * log_px).sum(-1)
    return {"log_px": [float(v) for v in log_px.mean(0)], "nll": float(nll.mean()),
            "nll_se": float(nll.std() / math.sqrt(replicates)),
            "estimator": f"randomised lattice in the prior quantiles ({nodes} x {inner_nodes} nodes, "
                         f"{replicates} shifts; upper bound in expectation)"}


def prior_guide(model):
    """A guide that draws every latent site of `model` from the model's own prior (the model with its observed
    sites hidden): for analysis.exact.evidence(model, prior_guide(model), data), which uses the guide's draws only to
    place its first breakpoints. Not a posterior approximation."""
    def guide(x):
        return poutine.block(model, hide_fn=lambda msg: msg["type"] == "sample" and msg["is_observed"])(x)
    return guide


__all__ = ["MarginalLikelihood", "QuantileMessenger", "log_evidence", "log_evidence_nodes", "log_likelihood",
           "check_marginal", "latent_scalars", "lattice_evidence", "prior_guide", "MAX_SCALARS"]
