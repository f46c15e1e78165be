"""Pareto k-hat diagnostics (Vehtari et al. 2024, "Pareto smoothed importance sampling", JMLR 25(72)).

Two uses:

* importance weights p(x_k, z) / q(z|x_k), z ~ q(.|x_k), per data point (`diagnose`, `khat`): k-hat is the
  estimated shape of the generalised Pareto tail of the weights. It is reported with the effective sample size
  (ESS, of the Pareto-smoothed weights) and the sample-size-dependent threshold min(1 - 1/log10 S, 0.7): below
  GOOD = 0.5 the weights have finite variance; below the threshold Pareto-smoothed estimates are reliable; above it
  q misses posterior mass. k-hat is scale-free, so when the weights are nearly constant (ESS/S >= CONSTANT_ESS) it
  fits a shape to noise and says nothing: that case is named instead. k-hat is itself an estimate from the
  M = min(S/5, 3 sqrt(S)) largest weights, with standard deviation about (1 + k) / sqrt(M) (the GPD maximum
  likelihood rate), reported as `sd`.
* per-sample values of a plain (or randomised quasi-) Monte Carlo mean (`tail_khat`): k-hat of the largest and of
  the smallest values. Which threshold: the S-dependent one (<= 0.7) says when a *Pareto-smoothed* estimate is
  reliable; a plain mean with a CLT standard error needs finite variance, i.e. k < 1/2. Since k-hat is itself
  noisy (sd above), callers show a standard error only where k-hat + 2 sd < 1/2: finite variance supported by
  the draws, not merely not excluded (montecarlo.monte_carlo, iwae.iwae).
"""
import math
import warnings

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample

from guides.check import DATA_PLATE, plates

from .qdensity import is_joint, log_prob64

GOOD = 0.5
BAD = 0.7        # the threshold for large S: min(1 - 1/log10 S, 0.7)
CONSTANT_ESS = 0.99  # ESS/S at or above this: the weights are nearly constant, k-hat is not informative
PARTICLE_PLATE = "_psis_particles"


def sample_traces(model, guide, x, samples: int, particle_dim: int = -2):
    """Vectorised traces (guide_trace, model_trace): `samples` guide draws per data point, replayed in the model.

    Sites get shape (samples, N, *event) (the particle plate sits left of the model's "data" plate). Only Pyro
    handlers touch model and guide, so any guide that samples the model's latent sites works."""
    with torch.no_grad(), pyro.validation_enabled(False), pyro.plate(PARTICLE_PLATE, samples, dim=particle_dim):
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


def log_weights_from_traces(guide_trace, model_trace, samples: int, points: int, beta: float = 1.0) -> np.ndarray:
    """log p(x, z) - log q(z|x) per data point from a pair of vectorised traces: an array (points, samples).
    beta != 1: the KL-weighted log w = log p(x|z) + beta (log p(z) - log q(z|x)), every latent site's log-density
    (model and guide) times beta, as a run trained with objective=iwae and train.beta weighs it (objectives.IWAE).

    For a joint guide (is_joint) every row holds the joint weight log p(x_0, z_0) p(x_1, z_1) - log q(z_0, z_1):
    an importance weight for log p(x_0, x_1), and, self-normalised, for each point's posterior p(z_k|x_k)."""
    per_point = torch.zeros(samples, points, dtype=torch.float64)
    shared = torch.zeros(samples, 1, dtype=torch.float64)  # sites outside the data plate
    with torch.no_grad(), pyro.validation_enabled(False):
        for sign, trace, observed in ((1, model_trace, None), (-1, guide_trace, False)):
            for _, site in _sample_sites(trace, observed):
                lp = log_prob64(site) * (1.0 if site["is_observed"] else beta)
                if DATA_PLATE in plates(site):
                    per_point = per_point + sign * _batched(lp, samples, points)
                else:
                    shared = shared + sign * torch.broadcast_to(lp, (samples, 1))
    if is_joint(guide_trace, model_trace):
        return (per_point.sum(1, keepdim=True) + shared).expand(samples, points).T.numpy()
    return (per_point + shared).T.numpy()


def _unwrapped(support):
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def narrow_support(guide_trace, model_trace) -> str:
    """'' where every latent site of the guide has the model's support; else which sites do not, e.g. "q(z) has
    support Interval where the model's z is real". A q narrower than the posterior's support (a Uniform q
    of a real latent) gives importance weights that never see the mass outside it: they are bounded, so k-hat reads
    as good, yet importance estimates of log p(x) converge to the log of the mass inside q's support, not to log
    p(x), and their standard error measures nothing of that bias."""
    parts = []
    for name, q in _sample_sites(guide_trace, observed=False):
        p = model_trace.nodes.get(name)
        if p is None or p["type"] != "sample" or p["is_observed"]:
            continue
        qs, ps = _unwrapped(q["fn"].support), _unwrapped(p["fn"].support)
        if ps is constraints.real and qs is not constraints.real:
            parts.append(f"q({name}) has support {type(qs).__name__.strip('_')} where the model's {name} is real")
    return "; ".join(parts)


def threshold(samples: int) -> float:
    """The sample-size-dependent k-hat threshold min(1 - 1/log10 S, 0.7) (Vehtari et al. 2024): above it even
    Pareto-smoothed estimates from S draws are unreliable."""
    return float(min(1.0 - 1.0 / math.log10(samples), BAD)) if samples > 10 else 0.0


def tail_length(samples: int) -> int:
    """M, the number of largest values the Pareto tail is fitted to: ceil(min(S/5, 3 sqrt(S))) (as arviz.psislw)."""
    return int(math.ceil(min(samples / 5.0, 3.0 * math.sqrt(samples))))


KHAT_SD_WORDS = "± is k-hat's asymptotic sd (1 + k) / sqrt(M), M its tail's draws: a formula, not a measured spread"


def khat_sd(k: float, samples: int) -> float:
    """The asymptotic approximation of k-hat's sampling standard deviation, (1 + k) / sqrt(M) (M = tail_length(S),
    k floored at -0.5): the large-M sd of a generalised Pareto shape estimate. A formula, not a spread measured
    between seeds; it holds as M grows (KHAT_SD_WORDS says so where it is printed)."""
    return float((1.0 + max(k, -0.5)) / math.sqrt(tail_length(samples))) if np.isfinite(k) else float("nan")


def _upper_khat(v: np.ndarray) -> float:
    """k-hat of the upper tail of v (arviz.psislw on log(v - min v)); 0 where fewer than 5 values exceed the
    tail's cutoff (bounded, e.g. constant values)."""
    import arviz as az

    m = tail_length(v.size)
    top = np.sort(v)[-(m + 1):]
    if v.size < 10 or np.count_nonzero(top > top[0]) < 5:
        return 0.0
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, k = az.psislw(np.log(v - v.min()))
    return float(k)


def tail_khat(values) -> float:
    """The Pareto k-hat of the heavier tail (largest or smallest values) of per-sample values of a Monte Carlo mean
    (Vehtari et al. 2024, sec. on plain Monte Carlo): < 0.5 finite variance, so a CLT standard error holds;
    0.5..1 infinite variance (the mean converges, slowly; no standard error); >= 1 the mean may not exist.
    inf where a value is not finite."""
    v = np.asarray(values, dtype=float).reshape(-1)
    if not np.all(np.isfinite(v)):
        return float("inf")
    return max(_upper_khat(v), _upper_khat(-v))


def diagnose(lw) -> list:
    """Per row of log weights lw (N, S): {'khat', 'sd', 'ess', 'ess_fraction', 'threshold', 'samples', 'verdict'}.

    khat from arviz.psislw; ess = 1 / sum of the squared normalised Pareto-smoothed weights; constant weights
    (spread below 1e-9 nats: q is the exact posterior) get khat 0; verdict is interpret()'s phrase."""
    import arviz as az

    lw = np.atleast_2d(np.asarray(lw, dtype=float))
    samples = lw.shape[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arviz warns on k > 0.7; interpret() says it in words
        slw, k = az.psislw(lw)
    k = np.atleast_1d(np.asarray(k, dtype=float)).copy()
    k[np.ptp(lw, axis=-1) < 1e-9] = 0.0
    ess = 1.0 / np.exp(2 * np.asarray(slw)).sum(-1)
    ess[~np.isfinite(ess)] = 0.0
    out = []
    for kk, e in zip(k, ess):
        d = {"khat": float(kk), "sd": khat_sd(kk, samples), "ess": float(e), "ess_fraction": float(e / samples),
             "threshold": threshold(samples), "samples": samples}
        d["verdict"] = interpret(kk, d["ess_fraction"], samples)
        out.append(d)
    return out


def khat(model, guide, data, samples: int = 10000) -> list:
    """Pareto k-hat per data point (arviz.psislw) of log p(x_k, z) - log q(z|x_k), z ~ q(.|x_k).

    Weights that are constant (spread below 1e-9 nats) mean q(z|x_k) is the exact posterior; psislw cannot fit a
    tail to them (it returns inf), so k-hat is reported as 0 there. samples: an integer >= 100 (ValueError in one line
    otherwise, as for data, model and guide that infer.checks.check_inputs refuses)."""
    from infer.checks import check_inputs
    from infer.validate import KHAT_MIN_SAMPLES, is_int, refuse

    if not (is_int(samples) and samples >= KHAT_MIN_SAMPLES):
        raise refuse("samples", samples, f"samples must be an integer >= {KHAT_MIN_SAMPLES} (draws per data point)")
    check_inputs(model, guide, data)
    return [d["khat"] for d in diagnose(log_weights(model, guide, data, samples))]


def interpret(k: float, ess_fraction: float = None, samples: int = None) -> str:
    """One phrase for a k-hat value (with ESS/S and S, when known, for the near-constant case and the threshold)."""
    limit = threshold(samples) if samples else BAD
    if ess_fraction is not None and ess_fraction >= CONSTANT_ESS:
        return (f"weights nearly constant (ESS/S = {ess_fraction:.5f}): q matches the posterior up to sampling noise, "
                "k-hat fits a shape to that noise and is not informative")
    if not np.isfinite(k):
        return "undefined (non-finite weights)"
    if k < GOOD:
        return "good: q covers the posterior, the weights have finite variance"
    if k <= limit:
        return "ok: q covers the posterior; importance weighting converges slowly (infinite variance)"
    return "bad: q misses posterior mass; importance-weighted estimates are unreliable"


def khat_lines(ks, labels=None) -> list:
    """Log lines: one per data point, e.g. 'k-hat x1=1^n: 0.31 (good: ...)'."""
    labels = labels or [f"x{k}" for k in range(len(ks))]
    return [f"k-hat {lab}: {k:.3f} ({interpret(k)}) [PSIS, arviz.psislw]" for lab, k in zip(labels, ks)]
