"""Randomised quasi-Monte Carlo noise for reparameterised Gaussian guide sites."""
import math

import torch
from pyro.distributions import Independent, Normal, TransformedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

LATTICE_HALF_WIDTH = 8.0  # the lattice noise (training's and evaluation's) covers eps in [-8, 8]: the N(0, 1) mass
#                          outside is 1e-15


def gaussian_base(fn):
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


def korobov_generators(points: int, dimension: int) -> torch.Tensor:
    """(dimension,) integer generators 1, a, a^2, ... mod `points` of a rank-1 (Korobov) lattice, with a the integer
    coprime to `points` nearest to points / golden ratio (for two coordinates this is close to the Fibonacci lattice,
    the best 2-D rank-1 rule). Each coordinate j * a^k mod points / points is a permutation of the grid k / points."""
    a = max(1, round(points / ((1 + 5 ** 0.5) / 2)))
    while math.gcd(a, points) != 1:
        a += 1
    return torch.tensor([pow(a, k, points) for k in range(dimension)], dtype=torch.float64)


class SobolNoise(Messenger):
    """Within this handler each Gaussian sample site draws z = loc + scale * eps with eps = Phi^-1(u), where
    u are the points of one freshly scrambled Sobol sequence over `num_particles` particles (dim `particle_dim`).
    A flow site (a TransformedDistribution over a Gaussian base) draws its base this way and pushes it through its
    transforms. Each scalar of noise per particle gets its own Sobol coordinate, shared by the data points. Every
    point is uniform, so estimates stay unbiased, but the particles cover the noise space evenly (lower variance).

    With lattice = L > 0 the noise is a randomly shifted rank-1 lattice instead (a randomised lattice rule, cheaper
    than a fresh Sobol scramble): the first noise coordinate is a randomly shifted uniform grid on [-L, L], and
    particle j carries the normalised weight phi(eps_j) / sum phi (`log_weights`): a randomised quadrature rule
    that puts particles in the tails every step (where a rare z near a decision boundary costs hundreds of nats)
    with the small weight they deserve, instead of hitting them rarely with full weight. Coordinate k >= 1 is
    u = frac(j a^k / P + s_k), eps = Phi^-1(u), with a uniform random shift s_k (korobov_generators): every u is
    uniform given the first coordinate, so the estimate stays unbiased. If no site takes the lattice coordinate (no
    Gaussian or flow site), `log_weights` stays None: the particles are unweighted."""

    def __init__(self, num_particles: int, particle_dim: int, dimension: int = 16, lattice: float = 0.0,
                 replicas: int = 0):
        super().__init__()
        self.num_particles, self.particle_dim, self.dimension = num_particles, particle_dim, dimension
        self.lattice = lattice
        self.log_weights = None
        # replicas = R > 0: a leading replica dim left of the particles, each replica with its own draws from its own
        # torch.Generator (`generators`, set by the caller): replica r's noise is what a single run's draw() gives
        # from the global RNG in the state of generator r (infer.replicas)
        self.replicas, self.generators = replicas, None
        if lattice:
            j = torch.arange(num_particles, dtype=torch.float64)
            self._grid = j  # the first coordinate's points before the shift
            self._rank1 = (j.unsqueeze(1) * korobov_generators(num_particles, dimension)) % num_particles
            self._rank1 = self._rank1 / num_particles  # (P, dimension) in [0, 1)

    def __enter__(self):
        self.draw()
        return super().__enter__()

    def draw(self):
        """Draw this step's noise from torch's RNG: a fresh Sobol scramble, or (lattice) fresh shifts, from which
        each site computes only the coordinates it takes."""
        self._used, self.log_weights = 0, None
        generators = self.generators if self.replicas else [None]
        if self.replicas and (generators is None or len(generators) != self.replicas):
            raise ValueError(f"SobolNoise with replicas={self.replicas} needs one torch.Generator per replica")
        if not self.lattice:
            eps = []
            for g in generators:
                seed = int(torch.randint(0, 2**31 - 1, (), generator=g))
                engine = torch.quasirandom.SobolEngine(self.dimension, scramble=True, seed=seed)
                u = engine.draw(self.num_particles).clamp(1e-7, 1 - 1e-7)
                eps.append(torch.special.ndtri(u.double()).float())
            self._eps = torch.stack(eps) if self.replicas else eps[0]
            return
        shifts = [torch.rand(self.dimension, dtype=torch.float64, generator=g) for g in generators]
        self._shift = torch.stack(shifts) if self.replicas else shifts[0]

    def set(self, noise):
        """Use given noise for the next run, in place of draw(): the lattice shifts ((dimension,) in [0, 1),
        float64) with lattice > 0, else eps ((num_particles, dimension), as draw() makes it)."""
        self._used, self.log_weights = 0, None
        if self.lattice:
            self._shift = noise
        else:
            self._eps = noise

    def noise(self):
        """This step's noise as set() takes it."""
        return self._shift if self.lattice else self._eps

    def _columns(self, start, width):
        """eps of noise coordinates start .. start + width - 1: (num_particles, width), float32; with lattice > 0
        (computed here, from the shifts) coordinate 0 is the shifted grid on [-L, L], and taking it sets
        log_weights (the normalised log phi(eps) of the quadrature rule)."""
        if not self.lattice:
            return self._eps[..., start:start + width]
        shift = self._shift.to(self._rank1.device).unsqueeze(-2)  # (1, D), or (R, 1, D) with replicas
        first = 1 if start == 0 else start  # coordinate 0 is the grid, not the rank-1 lattice
        eps = None
        if start + width > first:
            u = ((self._rank1[:, first:start + width] + shift[..., first:start + width]) % 1.0).clamp(1e-7, 1 - 1e-7)
            eps = torch.special.ndtri(u)
        if start == 0:
            P, L = self.num_particles, self.lattice
            grid = -L + (self._grid + shift[..., 0]) * (2 * L / P)  # a shifted uniform grid on [-L, L]: (P,), (R, P)
            eps = grid.unsqueeze(-1) if eps is None else torch.cat([grid.unsqueeze(-1), eps], -1)
            log_w = -0.5 * grid**2
            self.log_weights = (log_w - torch.logsumexp(log_w, -1, keepdim=True)).float()
        return eps.float()

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        transforms, base = _flow(msg["fn"])
        normal, dims = gaussian_base(base)
        event = normal.batch_shape[len(normal.batch_shape) - dims:] if normal is not None else None
        width = int(torch.Size(event).numel()) if event is not None else 0
        if normal is None or self._used + width > self.dimension:
            return
        lead = (self.replicas,) if self.replicas else ()
        eps = self._columns(self._used, width).reshape(lead + (self.num_particles,) + tuple(event))
        if self.log_weights is not None:
            self.log_weights = self.log_weights.to(normal.loc.device)  # this site took the lattice coordinate
        self._used += width
        eps = eps.reshape(lead + (self.num_particles,) + (1,) * (-self.particle_dim - 1) + tuple(event))
        eps = eps.to(dtype=normal.loc.dtype, device=normal.loc.device)  # a no-op on the CPU in float32
        value = normal.loc + normal.scale * eps
        for t in transforms:  # cached by transforms with cache_size=1, so log_prob(value) reuses the inverse
            value = t(value)
        msg["value"] = value
        msg["done"] = True
