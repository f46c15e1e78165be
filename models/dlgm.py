"""The deep latent Gaussian model p(z_L) prod_l p(z_l|z_{l+1}) p(x|z_1), with L = depth (2 by default)."""
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from infer.validate import check

from .arguments import records_arguments
from .nets import GaussianNet, mlp


class DLGM(nn.Module):
    """p(z_L) = N(0, I), p(z_l|z_{l+1}) = N(mu_l(z_{l+1}), sigma_l(z_{l+1})^2), p(x|z_1) = Bernoulli(logits f(z_1)).

    prior_gain puts a learnable log-gain on the prior nets' input, moved prior_gain_rate times faster than the
    other parameters (models.nets.LogGain): at n = 1000 and 8000 steps, rate 10 gave exact loss 0.729 (seeds 0, 1)
    and rate 30 0.723-0.724, where rate 1 gave 0.745-0.753; but at n = 5 rates 20 and 30 collapsed 2 of 8 seeds
    (the prior map went flat and z2 unused: loss 1.0658, the vae's), rate 10 none of 8 (n = 5 and n = 10).
    prior_gain_floor (None: none) is the lowest log-gain the prior nets' input gain acts with (models.nets.floored);
    the default 0.0 keeps a 3-layer prior net from flattening in its first steps (README, "The DLGM at n = 1000").
    Every default is the command line's (conf/model/dlgm.yaml; tests/test_defaults.py holds them equal)."""

    @records_arguments
    def __init__(self, n: int, depth: int = 2, latent_dim: int = 1, hidden: int = 64, layers: int = 2,
                 prior_hidden: int = 32, prior_layers: int = 3, activation: str = "elu", min_scale: float = 1e-5,
                 gain: bool = False, prior_gain: bool = True, prior_gain_rate: float = 10.0,
                 prior_gain_floor: float = 0.0):
        super().__init__()
        for name, value in (("n", n), ("depth", depth), ("latent_dim", latent_dim), ("hidden", hidden),
                            ("layers", layers), ("prior_hidden", prior_hidden), ("prior_layers", prior_layers),
                            ("activation", activation), ("min_scale", min_scale), ("gain", gain),
                            ("prior_gain", prior_gain), ("prior_gain_rate", prior_gain_rate),
                            ("prior_gain_floor", prior_gain_floor)):
            check(name, value)
        self.n, self.depth, self.latent_dim = n, depth, latent_dim
        self.latent_sites = tuple(f"z{l}" for l in range(1, depth + 1))
        self.decoder = mlp(latent_dim, n, hidden, layers, activation, gain)
        # priors[l - 1] is p(z_l | z_{l+1}) for l = 1 .. L-1
        self.priors = nn.ModuleList(
            GaussianNet(latent_dim, latent_dim, prior_hidden, prior_layers, activation, min_scale, prior_gain,
                        prior_gain_rate, prior_gain_floor)
            for _ in range(depth - 1))

    def forward(self, x: torch.Tensor):
        pyro.module("model", self)
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample(f"z{self.depth}", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            for l in range(self.depth - 1, 0, -1):
                loc, scale = self.priors[l - 1](z)
                z = pyro.sample(f"z{l}", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)
