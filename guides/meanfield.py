"""The mean-field guide: prod_l q(z_l|x), each factor a Gaussian amortised on x alone."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from infer.validate import check, check_model_argument
from models.arguments import records_arguments
from models.nets import GaussianNet


class MeanFieldGuide(nn.Module):
    """q(z1|x) q(z2|x) ... q(z_L|x): every latent site is encoded from x independently."""

    @records_arguments
    def __init__(self, model, hidden: int = 64, layers: int = 2, activation: str = "elu", min_scale: float = 1e-5):
        super().__init__()
        check_model_argument(model, needs=("n", "latent_dim", "latent_sites"))
        for name, value in (("hidden", hidden), ("layers", layers), ("activation", activation),
                            ("min_scale", min_scale)):
            check(name, value)
        self.n = model.n  # the data dimension the encoder is built for
        self.sites, d = tuple(model.latent_sites), model.latent_dim
        self.encoders = nn.ModuleList(GaussianNet(model.n, d, hidden, layers, activation, min_scale)
                                      for _ in self.sites)

    def forward(self, x: torch.Tensor):
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[-2]):
            for site, net in reversed(list(zip(self.sites, self.encoders))):
                loc, scale = net(x)
                pyro.sample(site, dist.Normal(loc, scale).to_event(1))
