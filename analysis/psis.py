"""Pareto k-hat (PSIS, Yao et al. 2018) of the importance weights p(x_k, z) / q(z|x_k), per data point.

k-hat is the estimated shape of the generalised Pareto tail of the weights: below GOOD = 0.5 the guide covers
the posterior well and importance-weighted estimates are reliable; above BAD = 0.7 the guide misses posterior
mass and estimates built on its samples (IWAE bounds, the ELBO itself) are not to be trusted.
"""
import warnings

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from guides.check import DATA_PLATE, plates

from .qdensity import is_joint

GOOD = 0.5
BAD = 0.7
PARTICLE_PLATE = "_psis_particles"


def sample_traces(model, guide, x, samples: int, particle_dim: int = -2):
    """Vectorised traces (guide_trace, model_trace): `samples` guide draws per data point, replayed in the model.

    Sites get shape (samples, N, *event) (the particle plate sits left of the model's "data" plate). Only Pyro
    handlers touch model and guide, so any guide that samples the model's latent sites works."""
    with torch.no_grad(), pyro.plate(PARTICLE_PLATE, samples, dim=particle_dim):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return guide_trace, model_trace


def _sample_sites(trace, observed=None):
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if observed is None or site["is_observed"] == observed:
            yield name, site


def _batched(t: torch.Tensor, samples: int, points: int) -> torch.Tensor:
    """A site's per-point log-density broadcast to (samples, points)."""
    return torch.broadcast_to(t, (samples, points))


def log_weights(model, guide, data, samples: int = 10000, chunk: int = 5000) -> np.ndarray:
    """log p(x_k, z) - log q(z|x_k) with z ~ q(.|x_k), unweighted by the data weights: an array (N, samples)."""
    from .iwae import log_weights as draws

    return draws(model, guide, data.x, samples, chunk).T.numpy()


def log_weights_from_traces(guide_trace, model_trace, samples: int, points: int) -> np.ndarray:
    """log p(x, z) - log q(z|x) per data point from a pair of vectorised traces: an array (points, samples).

    For a joint guide (is_joint) every row holds the joint weight log p(x_0, z_0) p(x_1, z_1) - log q(z_0, z_1):
    an importance weight for log p(x_0, x_1), and, self-normalised, for each point's posterior p(z_k|x_k)."""
    per_point = torch.zeros(samples, points, dtype=torch.float64)
    shared = torch.zeros(samples, 1, dtype=torch.float64)  # sites outside the data plate
    with torch.no_grad():
        for sign, trace, observed in ((1, model_trace, None), (-1, guide_trace, False)):
            for _, site in _sample_sites(trace, observed):
                lp = site["fn"].log_prob(site["value"]).double()
                if DATA_PLATE in plates(site):
                    per_point = per_point + sign * _batched(lp, samples, points)
                else:
                    shared = shared + sign * torch.broadcast_to(lp, (samples, 1))
    if is_joint(guide_trace, model_trace):
        return (per_point.sum(1, keepdim=True) + shared).expand(samples, points).T.numpy()
    return (per_point + shared).T.numpy()


def khat(model, guide, data, samples: int = 10000) -> list:
    """Pareto k-hat per data point (arviz.psislw) of log p(x_k, z) - log q(z|x_k), z ~ q(.|x_k).

    Weights that are constant (spread below 1e-9 nats) mean q(z|x_k) is the exact posterior; psislw cannot fit a
    tail to them (it returns inf), so k-hat is reported as 0 there."""
    import arviz as az

    lw = log_weights(model, guide, data, samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arviz warns on k > 0.7; interpret() says it in words
        _, k = az.psislw(lw)
    k = np.atleast_1d(np.asarray(k, dtype=float)).copy()
    k[np.ptp(lw, axis=-1) < 1e-9] = 0.0
    return [float(v) for v in k]


def interpret(k: float) -> str:
    """One phrase for a k-hat value."""
    if not np.isfinite(k):
        return "undefined (non-finite weights)"
    if k < GOOD:
        return "good: q covers the posterior"
    if k <= BAD:
        return "ok: q covers the posterior, importance weighting converges slowly"
    return "bad: q misses posterior mass; importance-weighted estimates are unreliable"


def khat_lines(ks, labels=None) -> list:
    """Log lines: one per data point, e.g. 'k-hat x1=1^n: 0.31 (good: ...)'."""
    labels = labels or [f"x{k}" for k in range(len(ks))]
    return [f"k-hat {lab}: {k:.3f} ({interpret(k)}) [PSIS, arviz.psislw]" for lab, k in zip(labels, ks)]
