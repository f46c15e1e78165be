"""The amortised Gaussian guide of the 1-layer VAE: q(z|x) = N(mu(x), sigma(x)^2)."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from infer.validate import check, check_model_argument
from models.arguments import records_arguments
from models.nets import GaussianNet


class GaussianGuide(nn.Module):
    """q(z|x) = N(mu(x), diag sigma(x)^2) for the model's single latent site `z`."""

    @records_arguments
    def __init__(self, model, hidden: int = 32, layers: int = 2, activation: str = "elu", min_scale: float = 1e-5):
        super().__init__()
        check_model_argument(model, needs=("n", "latent_dim"))
        for name, value in (("hidden", hidden), ("layers", layers), ("activation", activation),
                            ("min_scale", min_scale)):
            check(name, value)
        self.n = model.n  # the data dimension the encoder is built for
        self.encoder = GaussianNet(model.n, model.latent_dim, hidden, layers, activation, min_scale)

    def forward(self, x: torch.Tensor):
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[-2]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
