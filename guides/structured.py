"""The structured guide of the DLGM: q(z1|x) prod_l q(z_{l+1}|z_l), each factor Gaussian."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from infer.validate import check, check_model_argument
from models.arguments import records_arguments
from models.nets import GaussianNet


class StructuredGuide(nn.Module):
    """q(z1|x) q(z2|z1) ... q(z_L|z_{L-1}): the guide runs the model's chain upwards from x."""

    @records_arguments
    def __init__(self, model, hidden: int = 64, layers: int = 2, upper_hidden: int = 64, upper_layers: int = 2,
                 activation: str = "elu", min_scale: float = 1e-5,
                 gain: bool = False):
        super().__init__()
        check_model_argument(model, needs=("n", "latent_dim", "latent_sites"))
        for name, value in (("hidden", hidden), ("layers", layers), ("upper_hidden", upper_hidden),
                            ("upper_layers", upper_layers), ("activation", activation), ("min_scale", min_scale),
                            ("gain", gain)):
            check(name, value)
        self.n = model.n  # the data dimension the encoder is built for
        self.sites, d = tuple(model.latent_sites), model.latent_dim
        self.encoder = GaussianNet(model.n, d, hidden, layers, activation, min_scale)
        self.upper = nn.ModuleList(GaussianNet(d, d, upper_hidden, upper_layers, activation, min_scale, gain)
                                   for _ in self.sites[1:])

    def forward(self, x: torch.Tensor):
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[-2]):
            loc, scale = self.encoder(x)
            z = pyro.sample(self.sites[0], dist.Normal(loc, scale).to_event(1))
            for site, net in zip(self.sites[1:], self.upper):
                loc, scale = net(z)
                z = pyro.sample(site, dist.Normal(loc, scale).to_event(1))
