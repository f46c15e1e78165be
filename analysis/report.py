"""A run's evaluation and outputs: metrics.json, history.csv, checkpoint.pt and figures in one directory."""
import json
import time
from pathlib import Path

import pandas as pd

from infer.checkpoint import save_checkpoint
from .montecarlo import monte_carlo


def evaluate_run(model, guide, data, cfg, result) -> dict:
    """The metrics of a trained model/guide pair: config summary plus the Monte Carlo numbers."""
    t0 = time.perf_counter()
    mc = monte_carlo(model, guide, data, samples=cfg.eval.samples, replicates=cfg.eval.replicates,
                     noise=cfg.eval.noise)
    return {
        "model": cfg.model.name, "guide": cfg.guide.name, "objective": cfg.objective.name,
        "n": data.n, "seed": cfg.seed, "steps": result.steps, "wall_seconds": result.wall_seconds,
        **mc, "eval_seconds": time.perf_counter() - t0,
    }


def write_run(out: Path, model, guide, data, cfg, result, metrics: dict) -> None:
    """Write metrics.json, history.csv and checkpoint.pt into out."""
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
    save_checkpoint(out / "checkpoint.pt", result, extra={"model": cfg.model.name, "guide": cfg.guide.name})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def summary_lines(m: dict) -> list:
    """A short human summary of a run's metrics, every number tagged with its estimator."""
    tag = "[MC]" if m["estimator"].startswith("Monte") else "[RQMC]"
    lines = [f"{m['model']} + {m['guide']} guide, n={m['n']}, seed={m['seed']}: {m['steps']} steps in "
             f"{m['wall_seconds']:.1f} s (nats per data point)",
             f"  loss       {m['loss']:.4f} ± {m['loss_se']:.4f} {tag}",
             f"  recon      {m['recon']:.4f} {tag}",
             f"  recon/dim  {m['recon_per_dim']:.3e} {tag}"]
    lines += [f"  KL[{site}]{' ' * max(1, 7 - len(site))}{v:.4f} {tag}" for site, v in m["kl"].items()]
    lines.append(f"  {tag} = {m['estimator']}")
    return lines
