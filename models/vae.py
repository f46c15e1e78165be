"""The 1-layer VAE: p(z) = N(0, I_d), p(x|z) = prod_i Bernoulli(x_i | logits f_i(z))."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from infer.validate import check

from .arguments import records_arguments
from .nets import mlp


class VAE(nn.Module):
    """Generative model p(z) p(x|z) over x in {0,1}^n; call it as model(x) with x of shape (N, n)."""

    latent_sites = ("z",)

    @records_arguments
    def __init__(self, n: int, latent_dim: int = 1, hidden: int = 32, layers: int = 2, activation: str = "elu",
                 gain: bool = True):
        super().__init__()
        for name, value in (("n", n), ("latent_dim", latent_dim), ("hidden", hidden), ("layers", layers),
                            ("activation", activation), ("gain", gain)):
            check(name, value)
        self.n, self.latent_dim = n, latent_dim
        self.decoder = mlp(latent_dim, n, hidden, layers, activation, gain)

    def forward(self, x: torch.Tensor):
        pyro.module("model", self)
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)
