"""Randomised quasi-Monte Carlo noise for reparameterised Gaussian guide sites."""
import torch
from pyro.distributions import Independent, Normal, TransformedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample


def _gaussian(fn):
    """The Normal inside fn (possibly wrapped in Independent) and how many event dims were reinterpreted."""
    dims = 0
    while isinstance(fn, Independent):
        dims, fn = dims + fn.reinterpreted_batch_ndims, fn.base_dist
    return (fn, dims) if type(fn) is Normal else (None, 0)


def _flow(fn):
    """(transforms, base) for a TransformedDistribution (a normalising flow), else ((), fn)."""
    if isinstance(fn, TransformedDistribution):
        return tuple(fn.transforms), fn.base_dist
    return (), fn


class SobolNoise(Messenger):
    """Within this handler each Gaussian sample site draws z = loc + scale * eps with eps = Phi^-1(u), where
    u are the points of one freshly scrambled Sobol sequence over `num_particles` particles (dim `particle_dim`).
    A flow site (a TransformedDistribution over a Gaussian base) draws its base this way and pushes it through its
    transforms. Each scalar of noise per particle gets its own Sobol coordinate, shared by the data points. Every
    point is uniform, so estimates stay unbiased, but the particles cover the noise space evenly (lower variance).

    With lattice = L > 0 the first noise coordinate is instead a randomly shifted uniform grid on [-L, L] and
    particle j carries the normalised weight phi(eps_j) / sum phi (`log_weights`): a randomised quadrature rule
    that puts particles in the tails every step (where a rare z near a decision boundary costs hundreds of nats)
    with the small weight they deserve, instead of hitting them rarely with full weight. If no site takes the
    lattice coordinate (no Gaussian or flow site), `log_weights` stays None: the particles are unweighted."""

    def __init__(self, num_particles: int, particle_dim: int, dimension: int = 16, lattice: float = 0.0):
        super().__init__()
        self.num_particles, self.particle_dim, self.dimension = num_particles, particle_dim, dimension
        self.lattice = lattice
        self.log_weights = None

    def __enter__(self):
        seed = int(torch.randint(0, 2**31 - 1, ()))
        engine = torch.quasirandom.SobolEngine(self.dimension, scramble=True, seed=seed)
        u = engine.draw(self.num_particles).clamp(1e-7, 1 - 1e-7)
        self._eps, self._used = torch.special.ndtri(u.double()), 0
        self.log_weights, self._lattice_weights = None, None
        if self.lattice:  # first coordinate: a randomly shifted uniform grid on [-L, L] with weights phi(eps) h
            P, L = self.num_particles, self.lattice
            h = 2 * L / P
            eps = -L + (torch.arange(P, dtype=torch.float64) + float(torch.rand(()))) * h
            log_w = -0.5 * eps**2
            self._eps[:, 0] = eps
            self._lattice_weights = (log_w - torch.logsumexp(log_w, 0)).float()
        self._eps = self._eps.float()
        return super().__enter__()

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        transforms, base = _flow(msg["fn"])
        normal, dims = _gaussian(base)
        event = normal.batch_shape[len(normal.batch_shape) - dims:] if normal is not None else None
        width = int(torch.Size(event).numel()) if event is not None else 0
        if normal is None or self._used + width > self.dimension:
            return
        eps = self._eps[:, self._used:self._used + width].reshape((self.num_particles,) + tuple(event))
        if self._used == 0 and self._lattice_weights is not None:
            self.log_weights = self._lattice_weights.to(normal.loc.device)  # this site takes the lattice coordinate
        self._used += width
        eps = eps.reshape((self.num_particles,) + (1,) * (-self.particle_dim - 1) + tuple(event))
        eps = eps.to(dtype=normal.loc.dtype, device=normal.loc.device)  # a no-op on the CPU in float32
        value = normal.loc + normal.scale * eps
        for t in transforms:  # cached by transforms with cache_size=1, so log_prob(value) reuses the inverse
            value = t(value)
        msg["value"] = value
        msg["done"] = True
