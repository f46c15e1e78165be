"""A run's evaluation: evaluate() (the numbers of metrics.json) and evaluate_run() (with a config's settings). What
a run writes (write_run: analysis.run_outputs) and the printed summary of the metrics (analysis.summary_text) are
re-exported here."""
import contextlib
import functools
import logging
import math
import time

import torch
from pyro import poutine

from guides.check import latent_sites
from infer.runtime import serial_blas
from models import VAE

from .iwae import IWAE_SAMPLES  # draws per data point for the IWAE bound, at least 2 repeats of iwae_k
from .montecarlo import monte_carlo
from .describe import describe, final_kl_weight
from .run_outputs import write_run  # noqa: F401  re-exported: the README's API
from .summary_text import summary_lines  # noqa: F401  re-exported: run.py and the tests import it from here

log = logging.getLogger("onebit")
EXACT_MAX_SCALARS = 2  # quadrature up to this many scalar latents; IWAE beyond


def scalar_latents(guide, data) -> int:
    """How many scalar latents one data point has (the sum of the latent sites' event sizes)."""
    trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(data.x)
    return sum(trace.nodes[name]["fn"].event_shape.numel() for name in latent_sites(trace))


def on_cpu(*modules) -> bool:
    """Move the nn.Modules among `modules` to the CPU, in place, where any of their params or buffers lies
    elsewhere; True if anything moved. Evaluation (float64 quadrature, Monte Carlo, ArviZ) runs on the CPU."""
    moved = False
    for module in modules:
        if isinstance(module, torch.nn.Module) and any(
                t.device.type != "cpu" for t in (*module.parameters(), *module.buffers())):
            module.cpu()
            moved = True
    return moved


def evaluate(model, guide, data, samples: int = 16384, replicates: int = 16, noise: str = "lattice", tol: float = 1e-4,
             iwae_k: int = 1000, exact: bool = True, seed: int = None, khat_samples: int = None,
             trained_K: int = None, result=None, trained_beta: float = None, model_phase=None) -> tuple:
    """(metrics, grids) of a trained model and any guide over its latent sites, in nats per data point.

    The headline: metrics['loss'] is the most accurate estimate the run has and 'loss_estimator' names it:
    "exact" (quadrature; 'loss_se' None, 'loss_error' the quadrature's error) where quadrature runs, else the
    Monte Carlo estimate ('RQMC lattice', 'RQMC' or 'MC') with 'loss_se', or 'loss_se' None and a 'loss_note'
    where the tail of the per-sample losses says the variance may be infinite. 'recon', 'recon_per_dim', 'kl'
    (per site) and 'estimator' belong to that same estimator. The Monte Carlo numbers are always kept in the
    'montecarlo' block (see montecarlo.monte_carlo).

    Other blocks: `exact` (quadrature) with ELBO `surgery` (or `surgery_skipped`: why not), or, where quadrature
    cannot run (more than 2 scalar latents, or a guide whose density it cannot integrate, such as a joint guide
    over two latent sites), an
    `iwae` block whose `note` says why (and, in the second case, `exact_nll`: the model's evidence alone); PSIS
    `khat` (one per data point; the same value twice for a joint guide) with `psis` (ESS, threshold, verdict;
    psis.diagnose); and, for the 1-D VAE with equal weights, the Gaussian-family optimum. The importance-sampled
    NLL's ± holds by one rule (iwae.finite_variance) for its own block-mean k-hat and for the run's `khat` alike:
    where either fails it is withheld, and 'nll_note' names the k-hat that did. grids are the exact
    densities for the figures (None without quadrature). exact=False skips quadrature and IWAE. The Monte Carlo,
    IWAE and k-hat draws come from torch's RNG seeded with `seed` (forked: the caller's RNG state is untouched),
    so they do not depend on what ran before them; seed None (the default) is the run's seed where `result`
    records one (the command line evaluates a run with its own seed), else 0.
    k-hat uses khat_samples draws per point (default khat_draws:
    up to 4 x samples where that is cheap, i.e. small n). It runs on the CPU: a model or guide trained on another
    device (fit(device='cuda')) is moved to the CPU first, in place.

    trained_K (an integer >= 1, or None): also the IWAE-K loss, the objective a run trained with objective=iwae
    minimised, as metrics['trained_objective'] (analysis.iwae.bound, its ± the skew-corrected standard error of its
    repeats), at the KL weight the run's last step trained with: trained_beta (a finite number >= 0), or, where it
    is None, the one `result`'s recipe records (run_outputs.final_kl_weight), else 1; trained_K is taken from
    `result` where fit() trained on IWAE and trained_K is None (trained_k).
    result (what fit() returned, or None): metrics then also carry what write_run records of the run (describe: the
    names, steps, and what it minimised where that was not the -ELBO), so summary_lines says it as the command line
    does; model_phase (with result: the fit that trained the model by its exact likelihood before result fitted
    the guide to it) records the run as objective=exact's, as write_run(..., model_phase=) does.

    Refused in one line before any work (ValueError naming the argument), with the command line's bounds for its
    eval.* keys: samples not a multiple of replicates (an integer >= 2) with at least 2 draws per replicate (the
    command line also asks samples >= 10^4 for a run's final numbers), noise not lattice, qmc or mc, tol not a
    finite number > 0, iwae_k not an integer >= 1, exact not a bool, seed not an integer in [0, 2**32 - 1],
    khat_samples not None or an integer >= 100; then data, model and guide (infer.checks.check_inputs: the data's
    n, the guide's sites, shapes, plates, support and density), checked once for every estimator."""
    from infer.checks import check_inputs, inputs_checked
    from infer.validate import check, check_samples

    check_samples(samples, replicates)
    check("noise", noise)
    check("tol", tol)
    check("iwae_k", iwae_k)
    check("exact", exact)
    if seed is None:  # the run's own seed, as the command line evaluates it
        from .describe import result_seed

        seed = result_seed(result)
        seed = 0 if seed is None else seed
    check("eval_seed", seed, label="seed")
    check("khat_samples", khat_samples)
    if result is not None and not (hasattr(result, "history") and hasattr(result, "steps")):
        from infer.validate import refuse

        raise refuse("result", result, "result must be what fit() returned, or None")
    if trained_K is not None:
        check("iwae_k", trained_K, label="trained_K")
    if trained_beta is not None:
        check("beta", trained_beta, label="trained_beta")
    if model_phase is not None:  # as write_run's: the guide's fit to the model the first fit trained, frozen
        from .describe import check_two_phases

        check_two_phases(model, model_phase, result)
    trained_K = trained_k(result, trained_K)
    if on_cpu(model, guide):
        log.info("evaluation runs on the CPU: model and guide were moved there")
    check_inputs(model, guide, data)
    # exact, surgery, monte_carlo, iwae: checked once, here; MKL's matmuls serial, so torch's thread count changes no
    # number (infer.runtime.serial_blas); the quadratures' fixed-seed draws made once (shared_draws)
    from .shared_draws import shared_draws

    facts = describe(model, guide, data, result, model_phase) if result is not None else {}
    if trained_beta is None:
        trained_beta = final_kl_weight(facts)
    with inputs_checked(model, guide, data), serial_blas(), shared_draws():
        metrics, grids = _evaluate(model, guide, data, samples, replicates, noise, tol, iwae_k, exact, seed,
                                   khat_samples)
        if trained_K is not None:  # the IWAE-K bound the run was trained on, at its final parameters
            t0 = time.perf_counter()
            metrics["trained_objective"] = trained_bound(model, guide, data, trained_K, samples, seed,
                                                         metrics["psis"]["joint"], float(trained_beta))
            metrics["eval_seconds"] += time.perf_counter() - t0
    metrics["evaluation"] = {"samples": samples, "replicates": replicates, "noise": noise, "tol": tol,
                             "iwae_k": iwae_k, "seed": seed}  # as the command line's eval.* keys name them; seed:
    #                                                             the command line's is the run's
    from .describe import PYTHON_EVAL_DEFAULTS

    metrics["evaluation"].update({k: v for k, v in (("exact", exact), ("khat_samples", khat_samples))
                                  if v != PYTHON_EVAL_DEFAULTS[k]})  # only where not the command line's
    if result is not None:  # what the run was, as write_run records it (the evaluation's own keys win)
        metrics = {**{k: v for k, v in facts.items() if k not in metrics}, **metrics}
    return metrics, grids


def trained_k(result, trained_K: int = None):
    """The K of the IWAE bound a run trained on: trained_K where given, else the K of result's objective where fit()
    trained on IWAE (its recipe: objective IWAE, num_particles K), else None. A trained_K that contradicts result's K
    raises ValueError in one line (the trained_objective block would name a bound the run did not train on)."""
    from .describe import OBJECTIVE_NAMES

    plan = getattr(result, "recipe", None) or {}
    K = plan.get("num_particles") if OBJECTIVE_NAMES.get(plan.get("objective")) == "iwae" else None
    if trained_K is not None and K is not None and trained_K != K:
        raise ValueError(f"trained_K={trained_K} is not allowed with this result: it trained on the IWAE-{K} bound; "
                         f"leave trained_K out (it is taken from result) or pass {K}")
    return trained_K if trained_K is not None else K


def trained_bound(model, guide, data, K: int, samples: int, seed: int, joint: bool, beta: float = 1.0) -> dict:
    """The IWAE-K loss (analysis.iwae.bound) from `samples` draws per data point (at least 2 repeats of K), seeded
    with `seed` (forked), named and with its estimator: the objective an objective=iwae run minimised at KL weight
    beta (its weights log p(x|z) + beta (log p(z) - log q(z|x)), objectives.IWAE); 'beta' records it."""
    from .iwae import bound

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = bound(model, guide, data, K, max(samples, 2 * K), per=data.x.shape[-2] if joint else 1, beta=beta)
    weighted = "" if beta == 1 else f", KL weight {beta:g}"
    w = "w" if beta == 1 else f"w, log w = log p(x|z) + {beta:g} (log p(z) - log q(z|x))"
    out.update(name=f"IWAE-{K}{weighted}", beta=beta,
               estimator=f"importance sampling: {out['repeats']} repeats of log mean_K {w}, K = {K}, "
                                           "per data point; ± the Student-t, skew-corrected standard error of the "
                                           "repeats (finite variance for any weights' tail)")
    return out


def _evaluate(model, guide, data, samples, replicates, noise, tol, iwae_k, exact, seed, khat_samples) -> tuple:
    from .psis import diagnose, log_weights, narrow_support, sample_traces
    from .qdensity import is_joint

    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mc = monte_carlo(model, guide, data, samples=samples, replicates=replicates, noise=noise)
    metrics = {}
    grids, skipped, no_density = None, None, False
    if not exact:  # said in metrics.json and the printed summary: no headline is exact, by the caller's choice
        metrics["exact_skipped"] = "not asked for (evaluate(..., exact=False))"
    elif scalar_latents(guide, data) > EXACT_MAX_SCALARS:
        skipped = f"more than {EXACT_MAX_SCALARS} scalar latents per data point: no quadrature"
    else:
        from .exact import NotADensity, evidence, exact as quadrature, posterior_grid, surgery

        try:
            metrics["exact"] = quadrature(model, guide, data, tol=tol)
        except ValueError as err:  # e.g. a joint guide over two latent sites: a 4-D integral
            skipped, no_density = str(err), isinstance(err, NotADensity)
            with contextlib.suppress(ValueError):  # the model alone may still integrate (not a 2-D site)
                metrics["exact_nll"] = evidence(model, guide, data, tol=tol)
        else:
            bad = non_finite(metrics["exact"])
            if bad:  # a quadrature that failed is no headline: Monte Carlo and IWAE stand in, and say why
                failed = metrics.pop("exact")
                skipped = f"the exact quadrature returned non-finite {bad}"
                if math.isfinite(failed.get("nll", math.nan)):
                    metrics["exact_nll"] = failed["nll"]
    weights = {} if data.weights == (0.5, 0.5) else {"weights": list(data.weights), "entropy_floor": data.entropy}
    metrics = {"n": data.n, **weights, **headline(mc, metrics.get("exact")), "montecarlo": mc, **metrics}
    if no_density:  # the loss of a guide whose log_prob is no density bounds nothing
        metrics["loss_se"] = None
        metrics["loss_note"] = ("the quadrature found q(z|x_k) does not integrate to 1, so this loss bounds no NLL, "
                                "and its terms may read two densities (a closed-form KL, the guide's log_prob)")
    if "exact" in metrics:
        try:
            metrics["surgery"] = surgery(model, guide, data, tol=tol)
        except ValueError as err:  # q(t|x_k) not integrable on the surgery's grid: say so, report the rest
            metrics["surgery_skipped"] = str(err)
        try:
            grids = posterior_grid(model, guide, data, log_px=metrics["exact"]["log_px"])
        except ValueError as err:  # a grid that cannot be laid (e.g. a prior scale of 1e30): the figure goes
            metrics["posterior_skipped"] = str(err)
        else:
            grids = {site: g for site, g in grids.items() if isinstance(g, dict) and "grid" in g}
    elif skipped:
        from .iwae import iwae

        metrics["exact_skipped"] = skipped
        metrics["iwae"] = iwae(model, guide, data, K=iwae_k, samples=max(IWAE_SAMPLES, 2 * iwae_k), seed=seed)
        metrics["iwae"]["note"] = f"{skipped}: importance-sampled bounds stand in"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        psis = diagnose(log_weights(model, guide, data, khat_samples or khat_draws(samples, data.n)))
    with torch.random.fork_rng(), poutine.block():
        traces = sample_traces(model, guide, data.x, 1)
    joint, narrow = is_joint(*traces), narrow_support(*traces)
    metrics["khat"] = [d["khat"] for d in psis]
    if "iwae" in metrics:  # the NLL's ± must hold by the run's own k-hat too (one rule)
        from .iwae import withhold_nll_se

        withhold_nll_se(metrics["iwae"], psis, f"the run's k-hat, {psis[0]['samples']} draws")
    metrics["psis"] = {key: ([d[key] for d in psis] if key in ("khat", "sd", "ess", "ess_fraction", "verdict")
                             else psis[0][key]) for key in psis[0]}
    metrics["psis"]["joint"] = joint
    if narrow:  # bounded weights read as a good k-hat; they say nothing of the mass outside q's support
        metrics["psis"]["narrow"] = narrow
        metrics["psis"]["verdict"] = [f"not informative: {narrow}, so the weights never see the posterior mass "
                                      "outside it"] * len(psis)
    if joint:
        metrics["khat_note"] = "joint guide: k-hat of the joint weights p(x_0, z_0) p(x_1, z_1) / q(z_0, z_1)"
    for block in (metrics, metrics.get("exact"), metrics["montecarlo"]):  # the rate-distortion plane's coordinates
        if block is not None and "kl" in block:
            block["rate"], block["distortion"] = sum(block["kl"].values()), block["recon"]
    if isinstance(model, VAE) and model.latent_dim == 1 and data.weights == (0.5, 0.5):
        best = _gaussian_optimum_loss(data.n)
        metrics["gaussian_optimum"] = best
        metrics["gap_to_gaussian_optimum"] = metrics["loss"] - best
        if "exact" in metrics and gaussian_encoder(guide, data):
            from .frontier import distortion_above_frontier

            metrics["distortion_above_frontier"] = distortion_above_frontier(
                data.n, metrics["exact"]["rate"], metrics["exact"]["distortion"])
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics, grids


def khat_draws(samples: int, n: int) -> int:
    """Draws per point for k-hat: `samples`, raised up to 4 x samples while draws x 2 x n stays within one chunk
    of montecarlo.MAX_ELEMENTS (cheap: small n). k-hat's asymptotic sd, (1 + k) / sqrt(3 sqrt(S)) (psis.khat_sd), falls
    by sqrt(2) for 4 x the draws (0.08 -> 0.06 at k = 0.6)."""
    from .montecarlo import MAX_ELEMENTS

    return int(max(samples, min(4 * samples, MAX_ELEMENTS // (2 * n)) // 1024 * 1024))


@functools.lru_cache(maxsize=None)
def _gaussian_optimum_loss(n: int) -> float:
    """optimum.gaussian_optimum(n)['loss'], computed once per n and process (about 1 s of quadrature)."""
    from .optimum import gaussian_optimum

    return gaussian_optimum(n)["loss"]


def gaussian_encoder(guide, data) -> bool:
    """Whether q(z|x) is a Gaussian (Normal, possibly Independent) at the model's only latent site: the family the
    rate-distortion frontier (analysis.frontier) bounds."""
    from infer.noise import gaussian_base

    with torch.no_grad(), torch.random.fork_rng(), poutine.block():
        trace = poutine.trace(guide).get_trace(data.x)
    sites = latent_sites(trace)
    return len(sites) == 1 and gaussian_base(trace.nodes[sites[0]]["fn"])[0] is not None


def non_finite(exact: dict) -> str:
    """The exact block's numbers that are not finite ('' if none), e.g. 'loss, kl[z1], kl[z2]'."""
    values = {"loss": exact.get("loss"), "recon": exact.get("recon"),
              **{f"kl[{k}]": v for k, v in (exact.get("kl") or {}).items()}}
    return ", ".join(k for k, v in values.items() if v is None or not math.isfinite(v))


def headline(mc: dict, exact: dict = None) -> dict:
    """The headline keys of metrics.json from the Monte Carlo block and, where quadrature ran, the exact block:
    loss, loss_estimator, loss_se (None where no reliable standard error exists), loss_note (why, when withheld),
    loss_error (the quadrature's error, exact only), recon, recon_per_dim, kl, kl_total and estimator."""
    if exact is not None:
        return {"loss": exact["loss"], "loss_estimator": "exact", "loss_se": None, "loss_error": exact.get("error"),
                "recon": exact["recon"], "recon_per_dim": exact["recon_per_dim"], "kl": dict(exact["kl"]),
                "kl_total": sum(exact["kl"].values()), "estimator": exact["estimator"]}
    out = {"loss": mc["loss"], "loss_estimator": mc["kind"], "loss_se": mc["loss_se"], "recon": mc["recon"],
           "recon_per_dim": mc["recon_per_dim"], "kl": dict(mc["kl"]), "kl_total": mc["kl_total"],
           "estimator": mc["estimator"]}
    if "loss_note" in mc:
        out["loss_note"] = mc["loss_note"]
    return out


def evaluate_run(model, guide, data, cfg, result) -> tuple:
    """evaluate() with the settings of cfg.eval, headed by the config summary (names, n, seed, steps, wall time);
    for objective=iwae, its trained bound at the KL weight of the run's last step (run_outputs.final_kl_weight)."""
    from .describe import trained_on

    facts = trained_on(cfg.objective.name, cfg.train.beta, cfg.train.warmup, cfg.train.warmup_start, cfg.train.steps)
    head = {"model": cfg.model.name, "guide": cfg.guide.name, "objective": cfg.objective.name, "n": data.n,
            "seed": cfg.seed, "steps": result.steps, "wall_seconds": result.wall_seconds}
    metrics, grids = evaluate(model, guide, data, samples=cfg.eval.samples, replicates=cfg.eval.replicates,
                              noise=cfg.eval.noise, tol=cfg.eval.tol, iwae_k=cfg.eval.iwae_k, seed=cfg.seed,
                              trained_K=cfg.objective.K if cfg.objective.name == "iwae" else None,
                              trained_beta=final_kl_weight(facts))
    return {**head, **metrics}, grids
