"""A run's evaluation and outputs: metrics.json, history.csv, checkpoint.pt, encodings.nc and figures."""
import functools
import json
import logging
import math
import time
from pathlib import Path

import pandas as pd
import torch
from pyro import poutine

from guides.check import latent_sites
from infer.runtime import serial_blas
from infer.checkpoint import save_checkpoint
from models import VAE
from .iwae import IWAE_SAMPLES  # draws per data point for the IWAE bound, at least 2 repeats of iwae_k
from .montecarlo import monte_carlo

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
             iwae_k: int = 1000, exact: bool = True, seed: int = 0, khat_samples: int = None) -> tuple:
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
    psis.diagnose); and, for the 1-D VAE with equal weights, the Gaussian-family optimum. grids are the exact
    densities for the figures (None without quadrature). exact=False skips quadrature and IWAE. The Monte Carlo,
    IWAE and k-hat draws come from torch's RNG seeded with `seed` (forked: the caller's RNG state is untouched),
    so they do not depend on what ran before them. k-hat uses khat_samples draws per point (default khat_draws:
    up to 4 x samples where that is cheap, i.e. small n). It runs on the CPU: a model or guide trained on another
    device (fit(device='cuda')) is moved to the CPU first, in place.

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
    check("eval_seed", seed, label="seed")
    check("khat_samples", khat_samples)
    if on_cpu(model, guide):
        log.info("evaluation runs on the CPU: model and guide were moved there")
    check_inputs(model, guide, data)
    # exact, surgery, monte_carlo, iwae: checked once, here; MKL's matmuls serial, so torch's thread count changes no
    # number (infer.runtime.serial_blas)
    with inputs_checked(model, guide, data), serial_blas():
        return _evaluate(model, guide, data, samples, replicates, noise, tol, iwae_k, exact, seed, khat_samples)


def _evaluate(model, guide, data, samples, replicates, noise, tol, iwae_k, exact, seed, khat_samples) -> tuple:
    from .psis import diagnose, log_weights, sample_traces
    from .qdensity import is_joint

    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mc = monte_carlo(model, guide, data, samples=samples, replicates=replicates, noise=noise)
    metrics = {}
    grids, skipped = None, None
    if exact and scalar_latents(guide, data) > EXACT_MAX_SCALARS:
        skipped = f"more than {EXACT_MAX_SCALARS} scalar latents per data point: no quadrature"
    elif exact:
        from .exact import evidence, exact as quadrature, posterior_grid, surgery

        try:
            metrics["exact"] = quadrature(model, guide, data, tol=tol)
        except ValueError as err:  # e.g. a joint guide over two latent sites: a 4-D integral
            skipped = str(err)
            metrics["exact_nll"] = evidence(model, guide, data, tol=tol)  # the model alone still integrates
        else:
            bad = non_finite(metrics["exact"])
            if bad:  # a quadrature that failed is no headline: Monte Carlo and IWAE stand in, and say why
                failed = metrics.pop("exact")
                skipped = f"the exact quadrature returned non-finite {bad}"
                if math.isfinite(failed.get("nll", math.nan)):
                    metrics["exact_nll"] = failed["nll"]
    metrics = {"n": data.n, **headline(mc, metrics.get("exact")), "montecarlo": mc, **metrics}
    if "exact" in metrics:
        try:
            metrics["surgery"] = surgery(model, guide, data, tol=tol)
        except ValueError as err:  # q(t|x_k) not integrable on the surgery's grid: say so, report the rest
            metrics["surgery_skipped"] = str(err)
        grids = posterior_grid(model, guide, data, log_px=metrics["exact"]["log_px"])
        grids = {site: g for site, g in grids.items() if isinstance(g, dict) and "grid" in g}
    elif skipped:
        from .iwae import iwae

        metrics["exact_skipped"] = skipped
        metrics["iwae"] = iwae(model, guide, data, K=iwae_k, samples=max(IWAE_SAMPLES, 2 * iwae_k), seed=seed)
        metrics["iwae"]["note"] = f"{skipped}; importance-sampled bounds instead"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        psis = diagnose(log_weights(model, guide, data, khat_samples or khat_draws(samples, data.n)))
    with torch.random.fork_rng(), poutine.block():
        joint = is_joint(*sample_traces(model, guide, data.x, 1))
    metrics["khat"] = [d["khat"] for d in psis]
    metrics["psis"] = {key: ([d[key] for d in psis] if key in ("khat", "sd", "ess", "ess_fraction", "verdict")
                             else psis[0][key]) for key in psis[0]}
    metrics["psis"]["joint"] = joint
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
    of montecarlo.MAX_ELEMENTS (cheap: small n). k-hat's seed-to-seed sd, about (1 + k) / sqrt(3 sqrt(S)), falls
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
    """evaluate() with the settings of cfg.eval, headed by the config summary (names, n, seed, steps, wall time)."""
    head = {"model": cfg.model.name, "guide": cfg.guide.name, "objective": cfg.objective.name, "n": data.n,
            "seed": cfg.seed, "steps": result.steps, "wall_seconds": result.wall_seconds}
    metrics, grids = evaluate(model, guide, data, samples=cfg.eval.samples, replicates=cfg.eval.replicates,
                              noise=cfg.eval.noise, tol=cfg.eval.tol, iwae_k=cfg.eval.iwae_k, seed=cfg.seed)
    return {**head, **metrics}, grids


def describe(model, guide, data, result) -> dict:
    """What metrics.json's head says when no config does: model and guide names (their class or function
    names), n, and fit()'s steps and wall_seconds (and its seed where the result records one)."""
    def name(obj):
        return getattr(obj, "__name__", None) or type(obj).__name__

    head = {"model": name(model), "guide": name(guide), "n": data.n}
    seed = getattr(result, "seed", None)
    if seed is None:  # fit()'s FitResult records its seed in its recipe
        seed = (getattr(result, "recipe", None) or {}).get("seed")
    if seed is not None:
        head["seed"] = seed
    for key in ("steps", "wall_seconds"):
        if getattr(result, key, None) is not None:
            head[key] = getattr(result, key)
    return head


def write_run(out: Path, model, guide, data, result, metrics: dict, grids=None, figures: bool = True,
              title: str = None, checkpoint: bool = True) -> None:
    """Write metrics.json, history.csv, checkpoint.pt (unless checkpoint=False: run.py writes it, with its config,
    before evaluating), encodings.nc, and (figures=True) encodings.png and
    training.png into out. result is fit()'s return value; grids come from evaluate(). metrics.json gets the
    model and guide names, n, seed, steps and wall_seconds from `describe` where metrics lacks them."""
    from . import encodings as enc
    from .figures import encoding_figure, training_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {**{k: v for k, v in describe(model, guide, data, result).items() if k not in metrics}, **metrics}
    pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
    if checkpoint:
        save_checkpoint(out / "checkpoint.pt", result, extra={k: metrics[k] for k in ("model", "guide") if k in metrics})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    idata = enc.encodings(model, guide, data, grids=grids, khat=metrics.get("psis"))
    enc.save(idata, out / "encodings.nc")
    log.debug("ArviZ summary of the encodings (guide samples per data point):\n%s", enc.summary_text(idata))
    if figures:
        encoding_figure(idata, out / "encodings.png", title=title)
        training_figure(result.history, out / "training.png", floor=data.entropy,
                        optimum=metrics.get("gaussian_optimum"), title=title)


def _pm(value: float, se) -> str:
    """value ± se with the digits the standard error supports (at least 4 decimals)."""
    if se is None or not se > 0:
        return f"{value:.4f}" if se is None else f"{value:.6f} ± 0"
    digits = max(4, min(10, 1 - math.floor(math.log10(se))))
    return f"{value:.{digits}f} ± {se:.1e}" if se < 1e-4 else f"{value:.{digits}f} ± {se:.{digits}f}"


def _header(m: dict) -> str:
    """'vae + gaussian guide, n=1000, seed=0: 8000 steps in 35.9 s, evaluation 3.6 s (nats per data point)', with
    only the parts that are known."""
    who = " + ".join(p for p in (m.get("model"), f"{m['guide']} guide" if m.get("guide") else None) if p)
    facts = ", ".join(f"{k}={m[k]}" for k in ("n", "seed") if m.get(k) is not None)
    head = ", ".join(p for p in (who, facts) if p) or "run"
    timing = []
    if m.get("steps") is not None:
        timing.append(f"{m['steps']} steps" + (f" in {m['wall_seconds']:.1f} s" if m.get("wall_seconds") else ""))
    if m.get("eval_seconds") is not None:
        timing.append(f"evaluation {m['eval_seconds']:.1f} s")
    return head + (": " + ", ".join(timing) if timing else "") + " (nats per data point)"


def _site(name: str) -> str:
    """A latent site's printed name: a joint autoguide's auxiliary ('_AutoIAFNormal_latent') is 'joint'."""
    return "joint" if name.startswith("_") else name


def _kl_text(kl: dict, tag: str) -> str:
    """The rate (the KL) and, with several latent sites, each site's term: rate[s] = E[log q(s|.) - log p(s|.)]."""
    if len(kl) == 1:
        (site, value), = kl.items()
        return f"KL[{_site(site)}] {value:.4f} {tag}"
    terms = " + ".join(f"rate[{_site(s)}] {v:.4f}" for s, v in kl.items())
    return f"rate (= KL) {sum(kl.values()):.4f} = {terms} {tag}"


def summary_lines(m: dict) -> list:
    """A short human summary of a run's metrics (evaluate()'s, or metrics.json's), every number tagged with its
    estimator. The first number is the headline loss. exact()'s and monte_carlo()'s own dicts are summarised under
    their own estimator's tag; anything else that is not a dict is refused (ValueError in one line)."""
    if not isinstance(m, dict):
        from infer.validate import refuse

        raise refuse("m", m, "m must be a metrics dict: evaluate()'s metrics, a metrics.json read back, or the dict "
                             "of analysis.exact.exact or analysis.montecarlo.monte_carlo")
    e, mc = m.get("exact"), m.get("montecarlo")
    if e is None and mc is None and str(m.get("estimator", "")).startswith("exact quadrature") and "nll" in m:
        e = m  # exact()'s own dict: its numbers are exact, not an old metrics.json's Monte Carlo ones
    elif e is None and mc is None and "kind" in m and "loss_se" in m:
        mc = m  # monte_carlo()'s own dict
    lines = [_header(m)]
    if e is not None:
        lines += [f"  loss       {e['loss']:.4f} [exact]   NLL {e['nll']:.4f} [exact]   "
                  f"ELBO gap {e['gap']:.4f} [exact]",
                  f"  recon      {e['recon']:.4f} [exact]   recon/dim {e['recon_per_dim']:.3e} [exact]   "
                  + _kl_text(e["kl"], "[exact]")]
        if "total_correlation_per_point" in e:
            lines.append(f"  joint guide: KL = the marginals' average KL + the total correlation of q(z_0, z_1) / 2 "
                         f"{e['total_correlation_per_point']:.4f} [exact]")
    if mc is None and "estimator" in m and e is None:  # an old metrics.json: the Monte Carlo numbers at top level
        mc = {**m, "kind": "MC" if m["estimator"].startswith("Monte") else "RQMC"}
    if mc is not None:
        tag = f"[{mc['kind']}]"
        if mc.get("loss_se") is not None:
            loss = f"{_pm(mc['loss'], mc['loss_se'])} {tag}"
        else:
            loss = f"{mc['loss']:.4f} {tag}, no error bar: {mc.get('loss_note', 'no reliable standard error')}"
        if e is not None:
            lines.append(f"  loss       {loss}   (check of the exact loss: {mc['loss'] - e['loss']:+.2e})")
        else:
            lines.append(f"  loss       {loss}")
        lines.append(f"  recon      {mc['recon']:.4f} {tag}   recon/dim {mc['recon_per_dim']:.3e} {tag}   "
                     + _kl_text(mc["kl"], tag))
    if "model_phase" in m and e is not None:
        lines.append(f"  the model was trained by its exact likelihood ({m['model_phase']['steps']} steps), then the guide "
                     f"against it, frozen: NLL {e['nll']:.4f} [exact] is the model's, the ELBO gap {e['gap']:.4f} "
                     "[exact] the guide family's price")
    kl = (e or mc or {}).get("kl") or {}
    if len(kl) > 1:
        lines.append("  (rate[s] = E_q[log q(s|.) - log p(s|parents)], a layer's term, not a KL: it can be negative; "
                     "only their sum, the rate, is the KL of q to the model's prior)")
    if "surgery" in m:
        s = m["surgery"]
        t = s.get("site", "z")
        marginal = (f", q({t}|x) the guide's marginal" if len(kl) > 1 and not any(k.startswith("_") for k in kl)
                    else "")
        lines.append(f"  surgery    of {t}{marginal}: avg KL(q({t}|x)||p({t})) {s['avg_kl']:.4f} = I_q(x;{t}) "
                     f"{s['mutual_info']:.4f} + KL(q({t})||p({t})) {s['marginal_kl']:.4f} [exact]")
    if "surgery_skipped" in m:
        lines.append(f"  surgery    skipped: {m['surgery_skipped']}")
    if "exact_nll" in m:
        lines.append(f"  NLL        {m['exact_nll']['nll']:.4f} "
                     "[exact, the model alone: the guide's loss has no quadrature]")
    if "iwae" in m:
        lines += _iwae_lines(m["iwae"], m.get("exact_nll"))
    if "gap_to_gaussian_optimum" in m:
        gap = m["gap_to_gaussian_optimum"]
        where = (f"{gap:.4f} above it" if gap >= 0
                 else f"{-gap:.4f} below it (the optimum bounds Gaussian encoders only)")
        lines.append(f"  Gaussian-family optimum {m['gaussian_optimum']:.4f} [exact]; this run is {where}")
    lines += _khat_lines(m)
    if e is not None:
        lines.append(f"  [exact] = {e['estimator']}")
    if mc is not None:
        lines.append(f"  [{mc['kind']}] = {mc['estimator']}")
    return lines


def _iwae_lines(i: dict, exact_nll: dict = None) -> list:
    def pm(v, se, note):
        return _pm(v, se) if se is not None else f"{v:.4f} (no error bar: {note})"

    lines = [f"  IWAE-{i['K']} loss {pm(i['loss'], i.get('loss_se'), i.get('loss_note'))} [importance sampling]",
             f"  NLL        {pm(i['nll'], i.get('nll_se'), i.get('nll_note'))} [importance sampling]"]
    if exact_nll is not None:
        below = exact_nll["nll"] - i["loss"]
        if below > 0:  # an upper bound of the NLL in expectation: its estimate is below only by sampling error
            lines[0] += (f"; {below:.4f} below the exact NLL, a bound's sampling error"
                         + (f" ({below / i['loss_se']:.1f} SE)" if i.get("loss_se") else ""))
        gap = i["nll"] - exact_nll["nll"]
        lines[-1] += (f"; {abs(gap):.4f} {'above' if gap >= 0 else 'below'} the exact NLL"
                      + (": posterior mass the guide's draws rarely reach" if gap > 0 else ""))
    lines.append(f"             ({i['note']})")
    return lines


def _khat_lines(m: dict) -> list:
    """The PSIS k-hat line: value ± its sampling sd, ESS/S, and the threshold for S draws; near-constant weights
    said in words."""
    from .psis import CONSTANT_ESS, GOOD, interpret

    if "khat" not in m:
        return []
    p = m.get("psis")
    if p is None:  # an old metrics.json
        return ["  PSIS k-hat " + ", ".join(f"x{k}: {v:.2f}" for k, v in enumerate(m["khat"]))]
    points = [0] if p.get("joint") else range(len(m["khat"]))
    parts = []
    for k in points:
        label = "joint" if p.get("joint") else f"x{k}"
        if p["ess_fraction"][k] >= CONSTANT_ESS:
            parts.append(f"{label}: weights nearly constant, ESS/S {p['ess_fraction'][k]:.5f} "
                         "(q matches the posterior up to noise; k-hat not informative)")
        else:
            parts.append(f"{label}: {p['khat'][k]:.2f} ± {p['sd'][k]:.2f} (ESS/S {p['ess_fraction'][k]:.3f}; "
                         f"{interpret(p['khat'][k], p['ess_fraction'][k], p['samples']).split(':')[0]})")
    lines = [f"  PSIS k-hat of p(x,z)/q(z|x), {p['samples']} draws: " + "; ".join(parts)]
    lines.append(f"             (good < {GOOD}; reliable below min(1 - 1/log10 S, 0.7) = {p['threshold']:.2f}"
                 + (f"; {m['khat_note']}" if "khat_note" in m else "") + ")")
    return lines
