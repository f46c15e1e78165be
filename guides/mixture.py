"""The amortised mixture guide: q(z|x) = sum_k pi_k(x) N(z; mu_k(x), diag sigma_k(x)^2), K components.

For the DLGM the bottom latent z1 gets the mixture and the upper layers are Gaussian given the layer below, as in
the structured guide: q(z1|x) prod_l q(z_{l+1}|z_l).

Sampling is reparameterised, so every objective trains it with pathwise gradients:
* latent_dim >= 2: pyro.distributions.MixtureOfDiagNormals (pathwise derivatives of Jankowiak & Karaletsos 2018);
* latent_dim == 1, which MixtureOfDiagNormals does not support (its docs say so; measured against quadrature in
  pyro 1.9.2, its gradients for the mixture logits are off by up to 0.19 while locs and scales are right):
  NormalMixture1D, with implicit reparameterisation (Figurnov et al. 2018), dz/dtheta = -(dF(z)/dtheta) / q(z)
  with F the mixture's CDF, which in one dimension is the unique transport gradient (tests/test_zoo.py checks it
  against quadrature).
"""
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from infer.validate import check_all, check_model_argument
from models.arguments import records_arguments
from models.nets import GaussianNet, mlp


class NormalMixture1D(TorchDistribution):
    """A mixture of K univariate Normals with event shape (1,): locs, scales, logits of shape batch + (K,).
    rsample uses implicit reparameterisation through the mixture CDF (computed in float64, with the survival
    function in the right half so that tail gradients keep their precision)."""

    arg_constraints = {"locs": constraints.real, "scales": constraints.positive, "logits": constraints.real}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, locs, scales, logits, validate_args=None):
        self.locs, self.scales, self.logits = torch.broadcast_tensors(locs, scales, logits)
        super().__init__(self.locs.shape[:-1], torch.Size([1]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.locs.shape[-1:]
        return NormalMixture1D(self.locs.expand(shape), self.scales.expand(shape), self.logits.expand(shape),
                               validate_args=False)

    def _component_log_probs(self, z):  # z: (..., 1) -> (..., K)
        return (F.log_softmax(self.logits, -1) - self.scales.log() - 0.5 * math.log(2 * math.pi)
                - 0.5 * ((z - self.locs) / self.scales) ** 2)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return torch.logsumexp(self._component_log_probs(value), -1)

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            k = torch.distributions.Categorical(logits=self.logits.expand(shape + self.logits.shape[-1:])).sample()
            pick = lambda t: t.expand(shape + t.shape[-1:]).gather(-1, k.unsqueeze(-1))  # noqa: E731
            eps = torch.randn(shape + (1,), dtype=self.locs.dtype, device=self.locs.device)
            z0 = pick(self.locs) + pick(self.scales) * eps
        # implicit reparameterisation: the value is z0, the gradient is -(dF/dtheta)(z0) / q(z0)
        zd = z0.double()
        locs, scales, logits = self.locs.double(), self.scales.double(), self.logits.double()
        u = (zd - locs) / scales
        w = F.softmax(logits, -1)
        cdf = (w * torch.special.ndtr(u)).sum(-1, keepdim=True)
        sf = (w * torch.special.ndtr(-u)).sum(-1, keepdim=True)
        with torch.no_grad():
            log_q = torch.logsumexp(F.log_softmax(logits, -1) - scales.log() - 0.5 * math.log(2 * math.pi)
                                    - 0.5 * u ** 2, -1).unsqueeze(-1)
            right = cdf > 0.5
        moved = torch.where(right, -(sf - sf.detach()), cdf - cdf.detach())
        return z0 - (moved * torch.exp(-log_q)).to(z0.dtype)

    @property
    def mean(self):
        return (F.softmax(self.logits, -1) * self.locs).sum(-1, keepdim=True)


class MixtureGuide(nn.Module):
    """q(z|x) (VAE) or q(z1|x) (DLGM, with Gaussian q(z_{l+1}|z_l) above) a mixture of `components` diagonal
    Gaussians amortised on x. The component means start spread over [-spread, spread] (spread: a finite number >= 0)
    to break their symmetry."""

    @records_arguments
    def __init__(self, model, components: int = 3, hidden: int = 32, layers: int = 2, upper_hidden: int = 64,
                 upper_layers: int = 2, activation: str = "elu", min_scale: float = 1e-5, spread: float = 1.0):
        super().__init__()
        check_model_argument(model, needs=("n", "latent_dim", "latent_sites"))
        check_all(components=components, hidden=hidden, layers=layers, upper_hidden=upper_hidden,
                  upper_layers=upper_layers, activation=activation, min_scale=min_scale, spread=spread)
        self.n = model.n  # the data dimension the encoder is built for
        self.sites, self.d, self.K = tuple(model.latent_sites), model.latent_dim, components
        self.min_scale = min_scale
        self.encoder = mlp(model.n, components * (2 * self.d + 1), hidden, layers, activation)
        offsets = torch.linspace(-spread, spread, components) if components > 1 else torch.zeros(1)
        self.register_buffer("offsets", offsets)
        self.upper = nn.ModuleList(GaussianNet(self.d, self.d, upper_hidden, upper_layers, activation, min_scale)
                                   for _ in self.sites[1:])

    def mixture(self, x):
        """The distribution of the bottom latent given x (batch shape x.shape[:-1], event shape (latent_dim,))."""
        out = self.encoder(x)
        K, d = self.K, self.d
        locs, raw, logits = out[..., :K * d], out[..., K * d:2 * K * d], out[..., 2 * K * d:]
        locs = locs.reshape(locs.shape[:-1] + (K, d)) + self.offsets.unsqueeze(-1)
        scales = F.softplus(raw.reshape(raw.shape[:-1] + (K, d))) + self.min_scale
        if d == 1:
            return NormalMixture1D(locs[..., 0], scales[..., 0], logits)
        return dist.MixtureOfDiagNormals(locs, scales, logits)

    def forward(self, x: torch.Tensor):
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[-2]):
            z = pyro.sample(self.sites[0], self.mixture(x))
            for site, net in zip(self.sites[1:], self.upper):
                loc, scale = net(z)
                z = pyro.sample(site, dist.Normal(loc, scale).to_event(1))
