"""A run's evaluation and outputs: metrics.json, history.csv, checkpoint.pt, encodings.nc and figures."""
import json
import logging
import time
from pathlib import Path

import pandas as pd
from pyro import poutine

from guides.check import latent_sites
from infer.checkpoint import save_checkpoint
from .montecarlo import monte_carlo

log = logging.getLogger("onebit")
EXACT_MAX_SCALARS = 2  # quadrature up to this many scalar latents; IWAE beyond


def scalar_latents(guide, data) -> int:
    """How many scalar latents one data point has (the sum of the latent sites' event sizes)."""
    trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(data.x)
    return sum(trace.nodes[name]["fn"].event_shape.numel() for name in latent_sites(trace))


def evaluate_run(model, guide, data, cfg, result, exact_eval: bool = True) -> tuple:
    """(metrics, grids): the config summary, the RQMC numbers, and either an `exact` block with ELBO `surgery`
    (at most 2 scalar latents) or an `iwae` block, plus PSIS k-hat and the 1-D VAE's Gaussian-family optimum.
    grids are the exact densities for the figures (None without quadrature)."""
    from .psis import khat

    t0 = time.perf_counter()
    metrics = {
        "model": cfg.model.name, "guide": cfg.guide.name, "objective": cfg.objective.name,
        "n": data.n, "seed": cfg.seed, "steps": result.steps, "wall_seconds": result.wall_seconds,
        **monte_carlo(model, guide, data, samples=cfg.eval.samples, replicates=cfg.eval.replicates,
                      noise=cfg.eval.noise),
    }
    grids, quadrature = None, exact_eval and scalar_latents(guide, data) <= EXACT_MAX_SCALARS
    if quadrature:
        from .exact import exact, posterior_grid, surgery

        try:
            metrics["exact"] = exact(model, guide, data, tol=cfg.eval.tol)
        except ValueError as err:  # e.g. an autoguide with an auxiliary joint latent: no per-point density
            metrics["exact_skipped"], quadrature = str(err), False
    if quadrature:
        metrics["surgery"] = surgery(model, guide, data, tol=cfg.eval.tol)
        grids = posterior_grid(model, guide, data, log_px=metrics["exact"]["log_px"])
        grids = {site: g for site, g in grids.items() if isinstance(g, dict) and "grid" in g}
    elif exact_eval:
        from .iwae import iwae

        metrics["iwae"] = iwae(model, guide, data, K=cfg.eval.iwae_k)
        metrics["iwae"]["note"] = (f"more than {EXACT_MAX_SCALARS} scalar latents: no quadrature; "
                                   "importance-sampled bounds instead")
    metrics["khat"] = khat(model, guide, data, samples=cfg.eval.samples)
    if cfg.model.name == "vae" and model.latent_dim == 1 and data.weights == (0.5, 0.5):
        from .optimum import gaussian_optimum

        best = gaussian_optimum(data.n)["loss"]
        reference = metrics.get("exact", metrics)["loss"]
        metrics["gaussian_optimum"] = best
        metrics["gap_to_gaussian_optimum"] = reference - best
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics, grids


def write_run(out: Path, model, guide, data, cfg, result, metrics: dict, grids=None) -> None:
    """Write metrics.json, history.csv, checkpoint.pt, encodings.nc, encodings.png and training.png into out."""
    from . import encodings as enc
    from .figures import encoding_figure, training_figure

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
    save_checkpoint(out / "checkpoint.pt", result, extra={"model": cfg.model.name, "guide": cfg.guide.name})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    idata = enc.encodings(model, guide, data, grids=grids)
    enc.save(idata, out / "encodings.nc")
    log.info("ArviZ summary of the encodings (guide samples per data point):\n%s", enc.summary_text(idata))
    if cfg.eval.figures:
        title = f"{cfg.model.name} + {cfg.guide.name}, n={data.n}, seed={cfg.seed}"
        encoding_figure(idata, out / "encodings.png", title=title)
        training_figure(result.history, out / "training.png", floor=data.entropy,
                        optimum=metrics.get("gaussian_optimum"), title=title)


def summary_lines(m: dict) -> list:
    """A short human summary of a run's metrics, every number tagged with its estimator."""
    from .psis import BAD, GOOD

    tag = "[MC]" if m["estimator"].startswith("Monte") else "[RQMC]"
    lines = [f"{m['model']} + {m['guide']} guide, n={m['n']}, seed={m['seed']}: {m['steps']} steps in "
             f"{m['wall_seconds']:.1f} s, evaluation {m.get('eval_seconds', 0):.1f} s (nats per data point)",
             f"  loss       {m['loss']:.4f} ± {m['loss_se']:.4f} {tag}",
             f"  recon      {m['recon']:.4f} {tag}",
             f"  recon/dim  {m['recon_per_dim']:.3e} {tag}"]
    lines += [f"  KL[{site}]{' ' * max(1, 7 - len(site))}{v:.4f} {tag}" for site, v in m["kl"].items()]
    if "exact" in m:
        e = m["exact"]
        lines += [f"  loss       {e['loss']:.4f} [exact]   NLL {e['nll']:.4f} [exact]   ELBO gap {e['gap']:.4f} [exact]",
                  f"  recon      {e['recon']:.4f} [exact]   recon/dim {e['recon_per_dim']:.3e} [exact]   "
                  + "   ".join(f"KL[{s}] {v:.4f}" for s, v in e["kl"].items()) + " [exact]"]
    if "surgery" in m:
        s = m["surgery"]
        lines.append(f"  surgery    avg KL {s['avg_kl']:.4f} = I_q(x;z) {s['mutual_info']:.4f} + "
                     f"KL(q(z)||p(z)) {s['marginal_kl']:.4f} [exact]")
    if "iwae" in m:
        i = m["iwae"]
        lines.append(f"  IWAE-{i['K']} loss {i['loss']:.4f} ± {i['loss_se']:.4f}   NLL {i['nll']:.4f} ± {i['nll_se']:.4f}"
                     f" [importance sampling] ({i['note']})")
    if "gap_to_gaussian_optimum" in m:
        lines.append(f"  Gaussian-family optimum {m['gaussian_optimum']:.4f} [exact]; this run is "
                     f"{m['gap_to_gaussian_optimum']:+.4f} above it")
    if "khat" in m:
        lines.append("  PSIS k-hat " + ", ".join(f"x{k}: {v:.2f}" for k, v in enumerate(m["khat"]))
                     + f" (good < {GOOD}, bad > {BAD})")
    lines.append(f"  {tag} = {m['estimator']}")
    if "exact" in m:
        lines.append(f"  [exact] = {m['exact']['estimator']}")
    return lines
