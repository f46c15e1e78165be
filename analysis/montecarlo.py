"""Monte Carlo estimates of the loss terms through the training ELBO's traces, in chunks of bounded memory, with a
standard error only where the tail of the per-sample values allows one.

Memory: the largest tensor a chunk builds holds particles x data points x n values (the Bernoulli log-likelihood of
every bit), so a replicate's particles are evaluated `particles_per_chunk(n)` at a time; that bounds it by
MAX_ELEMENTS (2^25 values: 128 MB in float32) for any n. Chunking does not change the estimator: each replicate's
noise (one scrambled Sobol set) is drawn once, for all its particles, and then handed out chunk by chunk.
"""
import math

import pyro
import torch

from infer.elbo import ClosedFormELBO
from infer.weights import weighted
from infer.runtime import flush_denormals

from .mc_noise import NOISE_DIMENSION, Float64Likelihood, PresetNoise, replicate_noise
from .psis import khat_sd, tail_khat

MAX_ELEMENTS = 2 ** 25  # particles x data points x n per chunk: the largest tensor evaluation builds
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
KHAT_CLT = 0.5          # a CLT standard error needs finite variance: tail k-hat < 1/2
NOISES = ("lattice", "qmc", "mc")


def particles_per_chunk(n: int, points: int = 2, max_elements: int = MAX_ELEMENTS) -> int:
    """How many particles one chunk may evaluate so that particles x points x n <= max_elements (at least 1)."""
    return max(1, max_elements // (points * max(int(n), 1)))


def replicate_se(means: torch.Tensor, level: float = 0.95, symmetric: bool = False) -> float:
    """The standard error of the mean of R >= 2 independent, identically distributed replicate means (a 1-D tensor),
    widened so that mean ± Phi^-1((1 + level) / 2) x se holds the skew-corrected Student-t interval of the mean.

    Plain s / sqrt(R) understates the spread of mean - truth for two reasons, both measured on the lattice rule with
    R = 16 (z = (estimate - exact) / (s / sqrt R) over 2000 seeds: sd 1.10 to 1.17, |z| > 1.96 in 7 to 8%, z < -2 in
    4 to 6%): with R - 1 = 15 degrees of freedom the statistic is Student-t (sd 1.07, not 1), and the replicate means
    are right-skewed (skewness 0.7 to 1.5: a region of high loss and small probability that a replicate's point set
    hits or misses), which makes s small exactly when the mean is low. Hall's transformation (Hall 1992, "On the
    removal of skewness by transformation", JRSS B 54) g(T) = T + g1 (1 + 2 T^2) / (6 sqrt R) + g1^2 T^3 / (27 R),
    with g1 the sample skewness of the means and T = sqrt(R) (mean - truth) / s, is monotone and close to t_{R-1};
    inverting it at ± the t_{R-1} quantile gives an interval that is wider on the side the skew points to. The
    standard error returned is the wider half divided by the normal quantile, so that the symmetric ± se reads as
    usual and covers the asymmetric interval (same 2000 seeds: |z| > 1.96 in 3.6 to 4.6%, sd 0.90 to 0.93).
    Correct to O(1/R) in coverage when the replicate means have finite third moments; for symmetric means it is
    the t-based standard error, (t_{R-1} quantile / normal quantile) x s / sqrt(R).

    symmetric=True: the means are known to be symmetric about the truth, so the skewness is taken as 0 (the
    Student-t standard error). So for the one-coordinate lattice (a randomly shifted trapezoidal rule): its error
    is a smooth periodic function of the shift, led by its first Fourier harmonic, a sinusoid; there the sample
    skewness of a few means near float32 resolution is rounding noise (measured: 1e-9 of rounding in the means
    moved it by 0.5% at R = 4)."""
    from scipy.stats import norm, t as student_t

    x = means.double().reshape(-1)
    r = x.numel()
    d = x - x.mean()
    m2 = float((d * d).mean())
    if m2 == 0.0:
        return 0.0
    skew = 0.0 if symmetric else float((d ** 3).mean()) / m2 ** 1.5
    q = float(student_t.ppf(0.5 + level / 2, r - 1))
    shift, a = skew / (6 * math.sqrt(r)), skew / (3 * math.sqrt(r))

    def inverse(y):  # T with g(T) = y: g(T) = ((1 + a T)^3 - 1) / (3 a) + shift
        if abs(a) < 1e-12:
            return y - shift
        u = 1 + 3 * a * (y - shift)
        return (math.copysign(abs(u) ** (1 / 3), u) - 1) / a

    half = max(abs(inverse(q)), abs(inverse(-q)))
    return float(x.std()) / math.sqrt(r) * half / float(norm.ppf(0.5 + level / 2))


KINDS = {"lattice": "RQMC lattice", "qmc": "RQMC", "mc": "MC"}  # the estimator's tag, by the noise its draws had
DESCRIPTIONS = {"lattice": "randomised quasi-Monte Carlo, lattice rule (a randomly shifted grid on [-8, 8] in the "
                           "first noise coordinate, weights phi; scrambled Sobol in the others)",
                "qmc": "randomised quasi-Monte Carlo (scrambled Sobol)", "mc": "Monte Carlo"}


def drawn_noise(noise: str, preset: bool) -> str:
    """The noise the draws had: the `noise` asked where a guide site took the replicate's points (preset: see
    particle_values' info), else "mc". The lattice and Sobol points drive only Gaussian sites and flows over a
    Gaussian base (PresetNoise); a guide with none of them (a mixture, Laplace or StudentT q) is sampled by Pyro,
    i.i.d., so its estimate is plain Monte Carlo and is labelled, and given its standard error, as such."""
    return noise if preset else "mc"


def estimator_text(noise: str, drawn: str, iid_sites: int = 0) -> str:
    """What the estimator is, for the noise asked and the noise drawn (drawn_noise): DESCRIPTIONS[drawn], and why
    where the two differ; `iid_sites` guide sites that the points could not drive beside sites that they did are
    named: Pyro drew those i.i.d. within each replicate. The points drive only Gaussian sites and flows over a
    Gaussian base, in site order while their NOISE_DIMENSION coordinates last (PresetNoise): a site is left to Pyro
    for its distribution, or for its width (a Gaussian z of model.latent_dim=20), and the text names both causes."""
    if drawn == noise and drawn != "mc" and iid_sites:
        return (f"{DESCRIPTIONS[drawn]}, for the guide sites its points drive; {iid_sites} other guide "
                f"site{'s' if iid_sites > 1 else ''} drawn i.i.d. within each replicate (not Gaussian nor a flow "
                f"over a Gaussian base, or past the points' {NOISE_DIMENSION} coordinates; the replicates are "
                "independent, so the standard error of their means holds)")
    if drawn == noise:
        return DESCRIPTIONS[drawn]
    return (f"{DESCRIPTIONS[drawn]} (i.i.d. draws: noise={noise} was asked, but no guide site is Gaussian or a flow "
            f"over a Gaussian base of at most {NOISE_DIMENSION} scalars (the points' coordinates), the only sites "
            "its points can drive)")


def particle_values(model, guide, data, particles: int, noise: str = "qmc", closed_form: bool = True,
                    max_elements: int = MAX_ELEMENTS, elbos: dict = None, info: dict = None) -> dict:
    """{'recon': (particles,), 'kl_<site>': (particles,), ...} in float64: each loss term per particle of one
    replicate (one noise draw for all its particles, see replicate_noise), evaluated particles_per_chunk at a time.
    Weighted particles (the lattice, where a guide site takes its first coordinate) come multiplied by
    particles x weight, so the plain mean over the replicate is its weighted mean. `elbos` caches the
    ClosedFormELBO per chunk size (and its model-dependency analysis) across calls. `info`, if given, gets
    'lattice_only': True when the noise is the lattice and its one coordinate is all the randomness there is, and
    'preset': True when a guide site took the replicate's noise (PresetNoise.used: a Gaussian site or a flow over
    one); without such a site Pyro drew every site i.i.d., whatever `noise` asked."""
    model_w, guide_w = weighted(Float64Likelihood()(model), data), weighted(guide, data)
    eps, log_w = replicate_noise(particles, noise)
    chunk = particles_per_chunk(data.n, data.x.shape[-2], max_elements)
    elbos, parts = ({} if elbos is None else elbos), []
    with torch.no_grad(), pyro.validation_enabled(False):
        for start in range(0, particles, chunk):
            size = min(chunk, particles - start)
            if (size, closed_form) not in elbos:
                elbos[size, closed_form] = ClosedFormELBO(num_particles=size, closed_form=closed_form, noise="mc")
            elbo = elbos[size, closed_form]
            preset = None if eps is None else PresetNoise(eps[start:start + size])
            terms = elbo.particle_terms(model_w, guide_w if preset is None else preset(guide_w), data.x)
            factor = 1.0
            if log_w is not None and preset.used > 0:  # a site took the lattice coordinate
                factor = particles * log_w[start:start + size].exp()
            if info is not None:
                info["lattice_only"] = bool(log_w is not None and preset.used == 1 and preset.others == 0)
                info["preset"] = bool(preset is not None and preset.used > 0)
                info["iid_sites"] = preset.others if preset is not None and preset.used > 0 else 0
            parts.append({k: v.double().expand(size) * factor for k, v in terms.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@flush_denormals()
def monte_carlo(model, guide, data, samples: int = 16384, replicates: int = 16, noise: str = "lattice",
                closed_form: bool = True, max_elements: int = MAX_ELEMENTS) -> dict:
    """Estimate loss, recon, recon/dim and the KL per latent site from `samples` draws per data point.

    The draws come in `replicates` independent batches. With noise="lattice" (randomised lattice rule) or "qmc"
    (randomised quasi-Monte Carlo) each batch is one randomised point set (see replicate_noise) and the standard
    error is that of the batch means, widened for their R - 1 degrees of freedom and their skewness so that
    loss ± 1.96 loss_se is a 95% interval (replicate_se); with noise="mc" the draws are i.i.d. and the standard
    error is that of the draws. The points drive only Gaussian guide sites and flows over a Gaussian base: where a
    guide has none (a mixture, Laplace or StudentT q) every draw is Pyro's, i.i.d., and the estimate is Monte Carlo
    whatever `noise` asked: 'kind' is then "MC", the estimator says why, and the standard error is that of the draws
    (drawn_noise). The lattice puts particles in the far tails of the noise with their small weight; at
    large n, where a rare z near the decision boundary costs hundreds of nats, it is the estimator whose error bar
    holds (measured at n = 1000 against quadrature: vae, dlgm and flow guides within 1e-5), while scrambled Sobol
    and i.i.d. draws rarely reach that mass and understate both the loss and its error. Terms with a valid closed form
    (see ClosedFormELBO) are exact given the sampled parents. Nats per data point.

    A standard error assumes finite variance. Where the lattice coordinate is the only randomness (one scalar of
    Gaussian noise per point, e.g. the 1-D vae with a Gaussian or flow guide) the estimator is a randomised
    quadrature rule whose variance is finite (bounded weights on a bounded grid; 'tail_khat' None, 'tail_note').
    Otherwise it is diagnosed from the tails of the per-sample loss (the weighted per-particle values the
    replicate means average): tail_khat, the Pareto k-hat of its largest and smallest values (Vehtari et al. 2024).
    Unless the data put k-hat below KHAT_CLT = 0.5 by 2 of its sd, the variance may be infinite and the replicate
    means need not follow the CLT, so `loss_se` and `recon_se` are None and `loss_note` says why. Beware: no tail
    diagnostic sees mass that no draw reached.
    The standard error also carries a rounding floor, float32 eps x mean |per-sample value| (the networks compute
    in float32): the lattice's statistical error alone reaches 1e-10, far below what float32 networks resolve.
    Memory stays bounded for any n (see particles_per_chunk).

    Refused in one line (ValueError naming the argument) before any work: noise not in lattice, qmc, mc; samples
    not a multiple of replicates (>= 2) with at least 2 draws per replicate; data, model or guide as
    infer.checks.check_inputs refuses them (another n, a guide that does not sample the model's latent sites with
    their shapes and plates, a non-finite draw)."""
    from infer.checks import check_inputs
    from infer.validate import check, check_samples

    check("noise", noise)
    check_samples(samples, replicates)
    if not isinstance(closed_form, bool):
        check("closed_form", closed_form)
    check("chunk", max_elements, label="max_elements")
    check_inputs(model, guide, data)
    size = samples // replicates
    elbos, info = {}, {}
    batches = [particle_values(model, guide, data, size, noise, closed_form, max_elements, elbos, info)
               for _ in range(replicates)]
    terms = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}  # (replicates, size)
    loss = sum(terms.values())
    drawn = drawn_noise(noise, info.get("preset", False))
    if info.get("lattice_only"):  # a 1-D randomised quadrature: bounded weights on a bounded grid
        khat = None
        finite = bool(torch.isfinite(loss).all())
    else:
        khat = tail_khat(loss.reshape(-1).numpy())
        finite = bool(khat + 2 * khat_sd(khat, loss.numel()) < KHAT_CLT)  # finite variance supported by the data

    def se(t):
        if not finite:
            return None
        if drawn == "mc":
            stat = float(t.std() / math.sqrt(t.numel()))
        else:  # the replicate means are the samples: Student-t and skew-corrected (replicate_se)
            stat = replicate_se(t.mean(1), symmetric=khat is None)  # khat None: the one-coordinate lattice
        rounding = FLOAT32_EPS * float(t.abs().mean())  # the networks compute in float32
        return math.hypot(stat, rounding)

    kl = {k[3:]: float(v.mean()) for k, v in terms.items() if k.startswith("kl_")}
    recon = float(terms["recon"].mean())
    out = {
        "loss": float(loss.mean()),
        "loss_se": se(loss),
        "recon": recon,
        "recon_se": se(terms["recon"]),
        "recon_per_dim": recon / data.n,
        "kl": kl,
        "kl_total": sum(kl.values()),
        "samples": replicates * size,
        "kind": KINDS[drawn],
        "tail_khat": khat,
        "tail_khat_sd": None if khat is None else khat_sd(khat, loss.numel()),
        "tail_khat_limit": KHAT_CLT,
        "estimator": f"{estimator_text(noise, drawn, info.get('iid_sites', 0))}, {replicates} x {size} samples per "
                     "data point"
                     + (", closed-form entropy/KL where valid" if closed_form else ""),
    }
    if khat is None:
        out["tail_note"] = ("one noise coordinate, all on the lattice: a randomised quadrature rule with bounded "
                            "weights over a bounded grid, so the variance is finite (no tail to diagnose)")
    if not finite and khat is None:
        out["loss_note"] = "a per-sample loss is not finite: no standard error"
    elif not finite:
        sd = khat_sd(khat, loss.numel())
        out["loss_note"] = (f"heavy tail: Pareto k-hat {khat:.2f} ± {sd:.2f} (asymptotic sd) of the per-sample "
                            f"losses (not below {KHAT_CLT} by 2 sd), the variance may be infinite: no standard error")
    return out

