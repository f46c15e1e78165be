"""Importance-weighted bounds (IWAE, Burda et al. 2016) and an importance-sampled NLL, for any number of latents.

The log weights log p(x_k, z) - log q(z|x_k), z ~ q(.|x_k), come from tracing the guide under a vectorised particle
plate (dim -2, left of the model's "data" plate) and replaying the model, so any guide over the model's latents works.
"""
import math

import numpy as np
import torch
from pyro import poutine

from infer.runtime import flush_denormals

from .montecarlo import replicate_se
from .psis import CONSTANT_ESS, diagnose, log_weights_from_traces, narrow_support, sample_traces
from .qdensity import is_joint

KHAT_CLT = 0.5  # a CLT standard error needs finite variance: k-hat < 1/2
IWAE_SAMPLES = 65536  # draws per data point: iwae's default, and evaluate's (raised to 2 repeats of its iwae_k)


@flush_denormals()
def log_weights(model, guide, x, samples: int, chunk: int = 8192, beta: float = 1.0) -> torch.Tensor:
    """log p(x_k, z) - log q(z|x_k) for `samples` guide draws per data point: a float64 tensor (samples, N); with
    beta != 1 the KL-weighted log p(x_k|z) + beta (log p(z) - log q(z|x_k)) (psis.log_weights_from_traces).
    Draws are traced at most min(chunk, particles_per_chunk(n)) at a time: bounded memory for any n."""
    from .montecarlo import particles_per_chunk

    chunk = max(1, min(chunk, particles_per_chunk(x.shape[-1], x.shape[-2])))
    out = []
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        with poutine.block():
            guide_trace, model_trace = sample_traces(model, guide, x, size)
        out.append(torch.from_numpy(log_weights_from_traces(guide_trace, model_trace, size, x.shape[-2], beta).T))
    return torch.cat(out)


KHAT_BLOCK = 16384  # draws per block for the NLL's k-hat (the size the run's own k-hat uses)


def block_diagnose(lw: torch.Tensor, block: int = KHAT_BLOCK) -> list:
    """psis.diagnose per column of lw (S, N), averaged over the S // block disjoint blocks of `block` draws (one block
    when S < 2 block): k-hat at a fixed sample size with its asymptotic sd (psis.khat_sd, a formula) divided by
    sqrt(blocks). At a fixed size, because k-hat of a log-normal-like tail (a Gaussian q narrower than the
    posterior) reads lower the more draws it sees, while the estimate's trouble (posterior mass the draws rarely
    reach) does not go away."""
    S = lw.shape[0]
    blocks = max(1, S // block) if S >= 2 * block else 1
    size = S // blocks
    per = [diagnose(lw[b * size:(b + 1) * size].T.numpy()) for b in range(blocks)]
    out = []
    for col in range(lw.shape[1]):
        ds = [p[col] for p in per]
        d = {key: float(np.mean([x[key] for x in ds])) for key in ("khat", "ess", "ess_fraction")}
        d.update(samples=size, blocks=blocks, threshold=ds[0]["threshold"],
                 sd=float(np.mean([x["sd"] for x in ds]) / math.sqrt(blocks)))
        out.append(d)
    return out


def bound(model, guide, data, K: int, samples: int, chunk: int = 8192, per: int = 1, beta: float = 1.0) -> dict:
    """The IWAE-K loss -sum_k w_k E[log mean_K w] over max(samples // K, 2) independent repeats: {'loss', 'se',
    'log_px' (per point), 'repeats'}; per: 2 for a joint guide's weights, which count both points' log p(x_k).
    beta != 1: the bound of the KL-weighted weights log p(x|z) + beta (log p(z) - log q(z|x)) that objective=iwae
    trains with train.beta (objectives.IWAE); 'log_px' is then no log-evidence. Draws from torch's RNG.

    'se' is the standard error of the mean of the repeats as montecarlo.replicate_se widens it (Student-t for R - 1
    degrees of freedom, Hall's skew correction), so that loss ± 1.96 se is a 95% interval. log mean_K w has finite
    variance whatever the weights' tail, but where q is narrower than the posterior a rare large weight makes the
    repeats strongly skewed (measured: a VAE(5, latent_dim=2) after 300 steps, K = 1000, 65 repeats, skew -4.2:
    plain s / sqrt(R) missed the mean of 8000 repeats in 7.3% of 4000 resamples, replicate_se in 4.7%). Holds to
    O(1/R) in coverage where the repeats have finite third moments."""
    w = data.w.double()
    repeats = max(samples // K, 2)
    est = []
    for start in range(0, repeats, max(1, chunk // K)):
        r = min(max(1, chunk // K), repeats - start)
        lw = log_weights(model, guide, data.x, r * K, chunk=chunk, beta=beta).reshape(r, K, -1)
        est.append(_logmeanexp(lw, 1) / per)  # (r, N)
    est = torch.cat(est)  # (repeats, N)
    loss = -(est * w).sum(1)
    return {"loss": float(loss.mean()), "se": replicate_se(loss),
            "log_px": [float(v) for v in est.mean(0)], "repeats": repeats}


def _logmeanexp(t: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


def iwae(model, guide, data, K=(1, 8, 64, 512), samples: int = IWAE_SAMPLES, nll_samples: int = 262144,
         chunk: int = 8192, seed=None) -> dict:
    """IWAE losses -sum_k w_k E[log mean_K w] for each K (averaged over samples // K independent repeats, with
    standard errors), and an importance-sampled NLL from nll_samples draws per data point, with a delta-method
    standard error (nats per data point).

    Returns {'bounds': {K: {'loss', 'se', 'log_px': per point, 'repeats'}}, 'loss', 'loss_se', 'K' (the
    largest K), 'nll', 'nll_se', 'log_px', 'log_px_se', 'nll_khat', 'nll_ess', 'estimator'}. The IWAE loss decreases
    towards the NLL as K grows; the NLL estimate is consistent but, like any importance sampler, biased high (log p
    low) when q misses posterior mass. Both hold only where q's support is the model's (psis.narrow_support): a q
    of bounded support (a Uniform q of a real latent) makes them tend to -log of the mass inside it.

    Error bars only where they hold. A bound's 'se' is the Student-t, skew-corrected standard error of its repeats
    (bound): log mean_K w has finite variance even for Pareto-tailed weights (log w has exponential tails), so it
    holds; a bound's estimate may fall below the NLL by that sampling error. 'nll_se' and 'log_px_se' are None
    (with 'nll_note') unless the data put the PSIS k-hat of the importance weights (block_diagnose) below 0.5 by 2
    of its sd (finite_variance): with infinite variance the delta-method SE does not hold. evaluate() applies the
    same rule to the run's own k-hat (withhold_nll_se), so the ± shows only where every k-hat it prints allows it.
    The note adds that the estimate itself is unreliable above min(1 - 1/log10 S, 0.7). Where q's support is
    narrower than the model's they are None too, and the note says why ('narrow': which sites).

    A joint guide (one density over both data points, e.g. AutoIAFNormal) has only joint weights: the bounds and
    the NLL are then those of log p(x_0, x_1) / N (equal data weights only), every 'log_px' entry holds that
    value, and 'joint' is True.

    Refused in one line before any work (ValueError naming the argument): K not an integer >= 1 (or a non-empty
    list of them), samples below 2 x max(K), nll_samples below 2, seed outside [0, 2**32 - 1]; data, model and guide
    as infer.checks.check_inputs refuses them."""
    from infer.checks import check_inputs
    from infer.validate import check, is_int, refuse

    try:
        Ks = sorted({K} if is_int(K) else set(K))
    except TypeError:
        Ks = []
    if not Ks or not all(is_int(k) and k >= 1 for k in Ks):
        raise refuse("K", K, "K must be an integer >= 1 or a non-empty list of them (importance samples per bound)")
    Ks = [int(k) for k in Ks]
    if not (is_int(samples) and samples >= 2 * Ks[-1]):
        raise refuse("samples", samples, f"samples must be an integer >= 2 x the largest K = {2 * Ks[-1]} (draws per "
                                         "data point: at least 2 repeats of each bound)")
    check("nll_samples", nll_samples)
    check("chunk", chunk)
    if seed is not None:
        check("eval_seed", seed, label="seed")
    check_inputs(model, guide, data)
    w = data.w.double()
    with torch.random.fork_rng(), poutine.block():
        traces = sample_traces(model, guide, data.x, 1)
    joint, narrow = is_joint(*traces), narrow_support(*traces)
    if joint and not bool(torch.allclose(w, w.mean())):
        raise ValueError("a joint guide couples the data points: its bounds need equal data weights")
    per = data.x.shape[-2] if joint else 1  # a joint weight counts every point's log p(x_k) once
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        bounds = {k: bound(model, guide, data, k, samples, chunk, per) for k in Ks}
        lw = log_weights(model, guide, data.x, nll_samples, chunk=chunk)  # (S, N)
    log_px = _logmeanexp(lw, 0)
    ratio = (lw - log_px).exp()  # w / mean(w)
    log_px, log_px_se = log_px / per, ratio.std(0) / math.sqrt(lw.shape[0]) / per
    top = bounds[Ks[-1]]
    diag = block_diagnose(lw[:, :1] if joint else lw)  # the joint weights are one column, repeated
    worst = max(diag, key=lambda d: d["khat"])
    out = {
        "bounds": bounds, "K": Ks[-1], "loss": top["loss"], "loss_se": top["se"],
        "log_px": [float(v) for v in log_px], "log_px_se": [float(v) for v in log_px_se],
        "nll": float(-(w * log_px).sum()),
        "nll_se": float((w * log_px_se).sum() if joint else ((w * log_px_se) ** 2).sum().sqrt()),
        "nll_khat": [d["khat"] for d in diag], "nll_ess": [d["ess"] for d in diag],
        "nll_khat_block": diag[0]["samples"],
        "joint": joint,
        "estimator": f"importance sampling from the guide: IWAE bounds K={Ks} averaged over repeats; "
                     f"NLL from {nll_samples} draws per data point (delta-method standard error)"
                     + ("; joint guide: joint weights, log p(x_0, x_1) / N per point" if joint else ""),
    }
    if narrow:  # bounded weights, so a good k-hat, and yet the estimate misses the mass outside q's support
        out["nll_se"], out["log_px_se"], out["narrow"] = None, None, narrow
        out["nll_note"] = (f"{narrow}: its weights never see the posterior mass outside that support, so the "
                           "estimate tends to -log of the mass inside it (biased high) and no standard error holds")
    else:
        withhold_nll_se(out, [worst], f"mean over blocks of {worst['samples']} draws")
    return out


def finite_variance(d: dict) -> bool:
    """The rule for an importance-sampled NLL's error bar, from one k-hat record d of its weights (psis.diagnose or
    block_diagnose: 'khat', 'sd', 'ess_fraction'): the data put k-hat below KHAT_CLT by 2 of its sd (finite
    variance, so the delta-method standard error holds), or the weights are nearly constant (ESS/S >=
    CONSTANT_ESS: k-hat is not informative, and the variance is that of nearly constant weights)."""
    return d["khat"] + 2 * d["sd"] < KHAT_CLT or d["ess_fraction"] >= CONSTANT_ESS


def withhold_nll_se(out: dict, records: list, which: str) -> None:
    """Withhold out's 'nll_se' and 'log_px_se' (an iwae() result) where a k-hat record of its weights fails
    finite_variance, with an 'nll_note' naming that k-hat (which: where it comes from, e.g. 'the run's k-hat,
    65536 draws'). Called for every k-hat the run reports of the same weights, so that the NLL's ± shows only where
    each of them allows it: one rule, the strictest reading. A withheld error bar stays withheld."""
    failing = [d for d in records if not finite_variance(d)]
    if not failing or out.get("nll_se") is None:
        return
    worst = max(failing, key=lambda d: d["khat"])
    out["nll_se"], out["log_px_se"] = None, None
    out["nll_note"] = (f"heavy tail: PSIS k-hat {worst['khat']:.2f} ± {worst['sd']:.2f} (asymptotic sd) of the "
                       "importance weights "
                       f"({which}; not below {KHAT_CLT} by 2 sd), their variance may be infinite: no standard error"
                       + ("; above min(1 - 1/log10 S, 0.7), so the estimate itself is unreliable (biased high)"
                          if worst["khat"] > worst["threshold"] else ""))
