"""A run's evaluation and outputs: metrics.json, history.csv, checkpoint.pt, encodings.nc and figures."""
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch
from pyro import poutine

from guides.check import latent_sites
from infer.checkpoint import save_checkpoint
from models import VAE
from .montecarlo import monte_carlo

log = logging.getLogger("onebit")
EXACT_MAX_SCALARS = 2  # quadrature up to this many scalar latents; IWAE beyond


def scalar_latents(guide, data) -> int:
    """How many scalar latents one data point has (the sum of the latent sites' event sizes)."""
    trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(data.x)
    return sum(trace.nodes[name]["fn"].event_shape.numel() for name in latent_sites(trace))


def evaluate(model, guide, data, samples: int = 16384, replicates: int = 16, noise: str = "qmc", tol: float = 1e-4,
             iwae_k: int = 1000, exact: bool = True, seed: int = 0) -> tuple:
    """(metrics, grids) of a trained model and any guide over its latent sites, in nats per data point: the RQMC
    loss terms; an `exact` block (quadrature) with ELBO `surgery`, or, where quadrature cannot run (more than 2
    scalar latents, or a guide whose density it cannot integrate, such as a joint guide over two latent sites), an
    `iwae` block whose `note` says why (and, in the second case, `exact_nll`: the model's evidence alone); PSIS
    `khat`; and, for the 1-D VAE with equal weights, the Gaussian-family optimum. grids are the exact densities for
    the figures (None without quadrature). exact=False skips quadrature and IWAE. The IWAE and k-hat draws come from
    torch's RNG seeded with `seed` (forked: the caller's RNG state is untouched), so they do not depend on what ran
    before them."""
    from .psis import khat, sample_traces
    from .qdensity import is_joint

    t0 = time.perf_counter()
    metrics = monte_carlo(model, guide, data, samples=samples, replicates=replicates, noise=noise)
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
    if "exact" in metrics:
        metrics["surgery"] = surgery(model, guide, data, tol=tol)
        grids = posterior_grid(model, guide, data, log_px=metrics["exact"]["log_px"])
        grids = {site: g for site, g in grids.items() if isinstance(g, dict) and "grid" in g}
    elif skipped:
        from .iwae import iwae

        metrics["exact_skipped"] = skipped
        metrics["iwae"] = iwae(model, guide, data, K=iwae_k, seed=seed)
        metrics["iwae"]["note"] = f"{skipped}; importance-sampled bounds instead"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        metrics["khat"] = khat(model, guide, data, samples=samples)
    with torch.random.fork_rng(), poutine.block():
        if is_joint(*sample_traces(model, guide, data.x, 1)):
            metrics["khat_note"] = "joint guide: k-hat of the joint weights p(x_0, z_0) p(x_1, z_1) / q(z_0, z_1)"
    if isinstance(model, VAE) and model.latent_dim == 1 and data.weights == (0.5, 0.5):
        from .optimum import gaussian_optimum

        best = gaussian_optimum(data.n)["loss"]
        metrics["gaussian_optimum"] = best
        metrics["gap_to_gaussian_optimum"] = metrics.get("exact", metrics)["loss"] - best
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics, grids


def evaluate_run(model, guide, data, cfg, result) -> tuple:
    """evaluate() with the settings of cfg.eval, headed by the config summary (names, n, seed, steps, wall time)."""
    head = {"model": cfg.model.name, "guide": cfg.guide.name, "objective": cfg.objective.name, "n": data.n,
            "seed": cfg.seed, "steps": result.steps, "wall_seconds": result.wall_seconds}
    metrics, grids = evaluate(model, guide, data, samples=cfg.eval.samples, replicates=cfg.eval.replicates,
                              noise=cfg.eval.noise, tol=cfg.eval.tol, iwae_k=cfg.eval.iwae_k, seed=cfg.seed)
    return {**head, **metrics}, grids


def write_run(out: Path, model, guide, data, result, metrics: dict, grids=None, figures: bool = True,
              title: str = None) -> None:
    """Write metrics.json, history.csv, checkpoint.pt, encodings.nc, and (figures=True) encodings.png and
    training.png into out. result is fit()'s return value; grids come from evaluate()."""
    from . import encodings as enc
    from .figures import encoding_figure, training_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
    save_checkpoint(out / "checkpoint.pt", result, extra={k: metrics[k] for k in ("model", "guide") if k in metrics})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    idata = enc.encodings(model, guide, data, grids=grids)
    enc.save(idata, out / "encodings.nc")
    log.info("ArviZ summary of the encodings (guide samples per data point):\n%s", enc.summary_text(idata))
    if figures:
        encoding_figure(idata, out / "encodings.png", title=title)
        training_figure(result.history, out / "training.png", floor=data.entropy,
                        optimum=metrics.get("gaussian_optimum"), title=title)


def summary_lines(m: dict) -> list:
    """A short human summary of a run's metrics, every number tagged with its estimator."""
    from .psis import BAD, GOOD

    tag = "[MC]" if m["estimator"].startswith("Monte") else "[RQMC]"
    lines = [f"{m.get('model', 'model')} + {m.get('guide', 'a')} guide, n={m.get('n', '?')}, seed={m.get('seed', '?')}: "
             f"{m.get('steps', '?')} steps in {m.get('wall_seconds', 0):.1f} s, evaluation {m.get('eval_seconds', 0):.1f} s "
             "(nats per data point)",
             f"  loss       {m['loss']:.4f} ± {m['loss_se']:.4f} {tag}",
             f"  recon      {m['recon']:.4f} {tag}",
             f"  recon/dim  {m['recon_per_dim']:.3e} {tag}"]
    lines += [f"  KL[{site}]{' ' * max(1, 7 - len(site))}{v:.4f} {tag}" for site, v in m["kl"].items()]
    if "exact" in m:
        e = m["exact"]
        lines += [f"  loss       {e['loss']:.4f} [exact]   NLL {e['nll']:.4f} [exact]   ELBO gap {e['gap']:.4f} [exact]",
                  f"  recon      {e['recon']:.4f} [exact]   recon/dim {e['recon_per_dim']:.3e} [exact]   "
                  + "   ".join(f"KL[{s}] {v:.4f}" for s, v in e["kl"].items()) + " [exact]"]
        if "total_correlation_per_point" in e:
            lines.append(f"  joint guide: KL[z] = the marginals' average KL + the total correlation of q(z_0, z_1) / 2 "
                         f"{e['total_correlation_per_point']:.4f} [exact]")
    if "surgery" in m:
        s = m["surgery"]
        lines.append(f"  surgery    avg KL {s['avg_kl']:.4f} = I_q(x;z) {s['mutual_info']:.4f} + "
                     f"KL(q(z)||p(z)) {s['marginal_kl']:.4f} [exact]")
    if "exact_nll" in m:
        lines.append(f"  NLL        {m['exact_nll']['nll']:.4f} [exact, the model alone: the guide's loss has no quadrature]")
    if "iwae" in m:
        i = m["iwae"]
        lines.append(f"  IWAE-{i['K']} loss {i['loss']:.4f} ± {i['loss_se']:.4f}   NLL {i['nll']:.4f} ± {i['nll_se']:.4f}"
                     f" [importance sampling] ({i['note']})")
    if "gap_to_gaussian_optimum" in m:
        lines.append(f"  Gaussian-family optimum {m['gaussian_optimum']:.4f} [exact]; this run is "
                     f"{m['gap_to_gaussian_optimum']:+.4f} above it")
    if "khat_note" in m:
        lines.append(f"  PSIS k-hat {m['khat'][0]:.2f} ({m['khat_note']}; good < {GOOD}, bad > {BAD})")
    elif "khat" in m:
        lines.append("  PSIS k-hat " + ", ".join(f"x{k}: {v:.2f}" for k, v in enumerate(m["khat"]))
                     + f" (good < {GOOD}, bad > {BAD})")
    lines.append(f"  {tag} = {m['estimator']}")
    if "exact" in m:
        lines.append(f"  [exact] = {m['exact']['estimator']}")
    return lines
