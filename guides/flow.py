"""The amortised normalising-flow guide: each latent site is a conditional flow of a standard Gaussian.

For the VAE, q(z|x); for the DLGM, q(z1|x) prod_l q(z_{l+1}|z_l), each factor

    eps ~ N(0, I),   y = S_c(eps) (spline flows),   z = loc(c) + scale(c) * y,

where c is the site's context (x for the bottom latent, z_l for z_{l+1}), S_c are conditional rational-quadratic or
rational-linear splines on [-bound, bound] (identity outside) from pyro.distributions.transforms.conditional_spline
and the last step is a conditional affine map. A 1-D spline can bend N(0, 1) into a one-sided density such as the
half-Gaussian true posterior of the one-bit VAE, which no Gaussian can match.
"""
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.conditional import (ConditionalDistribution, ConditionalTransformedDistribution,
                                            ConditionalTransformModule)
from pyro.distributions.transforms import conditional_spline
from torch import nn
from torch.distributions.transforms import AffineTransform

from infer.validate import check_all, check_model_argument
from models.arguments import records_arguments
from models.nets import GaussianNet


class StandardNormal(ConditionalDistribution):
    """N(0, I_d) with the batch shape of the context (all but its last dim), so the flow has the data plate's shape."""

    def __init__(self, dim: int):
        self.dim = dim

    def condition(self, context):
        return dist.Normal(context.new_zeros(context.shape[:-1] + (self.dim,)), 1.0).to_event(1)


class ConditionalAffine(ConditionalTransformModule):
    """y -> loc(c) + scale(c) * y, with (loc, scale) from a GaussianNet of the context c (diagonal, event dim 1)."""

    bijective = True

    def __init__(self, context_dim: int, dim: int, hidden: int, layers: int, activation: str = "elu",
                 min_scale: float = 1e-5):
        super().__init__()
        self.net = GaussianNet(context_dim, dim, hidden, layers, activation, min_scale)

    def condition(self, context):
        loc, scale = self.net(context)
        return AffineTransform(loc, scale, event_dim=1, cache_size=1)  # cached: log_prob(sample) never inverts


class FlowGuide(nn.Module):
    """Amortised spline-flow guide for the VAE (site z) and the DLGM (z1 from x, then z_{l+1} from z_l).

    Sites are sampled from dist.ConditionalTransformedDistribution(...).condition(context), which broadcasts over
    leading particle dims (a context of shape (2, n) serves samples of shape (P, 2, d))."""

    @records_arguments
    def __init__(self, model, hidden: int = 32, layers: int = 2, flows: int = 1, count_bins: int = 8,
                 bound: float = 5.0, order: str = "linear", activation: str = "elu", min_scale: float = 1e-5):
        super().__init__()
        check_model_argument(model, needs=("n", "latent_dim", "latent_sites"))
        check_all(hidden=hidden, layers=layers, flows=flows, count_bins=count_bins, bound=bound, order=order,
                  activation=activation, min_scale=min_scale)
        self.n = model.n  # the data dimension the flows are built for
        self.sites, d = tuple(model.latent_sites), model.latent_dim
        contexts = [model.n] + [d] * (len(self.sites) - 1)
        self.splines = nn.ModuleList(
            nn.ModuleList(conditional_spline(d, c, [hidden] * layers, count_bins=count_bins, bound=bound,
                                             order=order) for _ in range(flows))
            for c in contexts)
        self.affines = nn.ModuleList(ConditionalAffine(c, d, hidden, layers, activation, min_scale) for c in contexts)
        self.flows = [ConditionalTransformedDistribution(StandardNormal(d), [*splines, affine])
                      for splines, affine in zip(self.splines, self.affines)]

    def forward(self, x: torch.Tensor):
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[-2]):
            context = x
            for site, flow in zip(self.sites, self.flows):
                context = pyro.sample(site, flow.condition(context))
