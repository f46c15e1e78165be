"""Hydra entry point: compose the config, build data, model and guide, fit, evaluate, write the run's outputs.

    python run.py                                   # vae at n = 1000
    python run.py model=dlgm data.n=1000            # the DLGM with its structured guide
    python run.py -m model=vae,dlgm data.n=1,5,10,100,1000 seed=0,1,2 hydra/launcher=joblib
"""
import json
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parent / "conf"
GROUPS = ("data", "model", "guide", "objective", "optim", "experiment")
log = logging.getLogger("onebit")


class ConfigError(ValueError):
    """A config value outside what is allowed; its message names the key."""


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key -> (test, what is allowed); keys absent from the config are skipped
RULES = {
    "data.n": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "data.weights": (lambda v: len(v) == 2 and all(is_number(w) and w > 0 for w in v) and abs(sum(v) - 1) < 1e-9,
                     "two positive numbers that sum to 1"),
    "seed": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "threads": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "train.steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "train.num_particles": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "train.log_every": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "train.progress": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "train.beta": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "train.checkpoint_every": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: only at the end)"),
    "train.warmup": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "train.warmup_start": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "optim.lr": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "optim.lr_final": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "optim.schedule": (lambda v: v in ("exponential", "cosine", "constant"), "exponential, cosine or constant"),
    "optim.betas": (lambda v: len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "objective.noise": (lambda v: v in ("mc", "qmc", "lattice"), "mc, qmc or lattice"),
    "objective.closed_form": (lambda v: isinstance(v, bool), "true or false"),
    "objective.free_bits": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "objective.K": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "eval.samples": (lambda v: is_int(v) and v >= 10000, "an integer >= 10000 (final numbers need 10^4 draws)"),
    "eval.replicates": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "eval.tol": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "eval.iwae_k": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "eval.noise": (lambda v: v in ("mc", "qmc"), "mc or qmc"),
    "model.latent_dim": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "model.depth": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "model.activation": (lambda v: v in ("elu", "relu", "tanh", "silu", "softplus"), "elu, relu, tanh, silu or softplus"),
    "guide.activation": (lambda v: v in ("elu", "relu", "tanh", "silu", "softplus"), "elu, relu, tanh, silu or softplus"),
    "guide.components": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "guide.flows": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "guide.count_bins": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "guide.bound": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "guide.order": (lambda v: v in ("linear", "quadratic"), "linear or quadratic"),
    **{f"{g}.{k}": (lambda v: is_int(v) and v >= 1, "an integer >= 1")
       for g in ("model", "guide") for k in ("hidden", "prior_hidden", "upper_hidden")},
    **{f"{g}.{k}": (lambda v: is_int(v) and v >= 0, "an integer >= 0")
       for g in ("model", "guide") for k in ("layers", "prior_layers", "upper_layers")},
}


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is not allowed."""
    for key, (test, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if isinstance(value, str) and value == "<absent>":
            continue
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        try:
            ok = test(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{key}={value!r} is not allowed: {key} must be {allowed}")


def check_group_choices(argv) -> None:
    """Refuse `group=option` overrides whose option has no yaml in conf/<group>/, before Hydra composes."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        group = key.split("@")[0]
        if not sep or group not in GROUPS:
            continue
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        for choice in value.split(","):
            if choice and choice != "null" and choice not in options:
                raise ConfigError(f"{group}={choice} is not allowed: {group} must be one of {', '.join(options)}")


def build(cfg: DictConfig):
    """The data, model and guide a config describes (instantiated from the _target_ of model and guide)."""
    from hydra.utils import instantiate

    from models import OneBit

    def spec(node):
        return {k: v for k, v in OmegaConf.to_container(node).items() if k != "name"}

    data = OneBit(cfg.data.n, tuple(cfg.data.weights))
    model = instantiate(spec(cfg.model), n=data.n)
    guide = instantiate(spec(cfg.guide), model=model)
    return data, model, guide


def build_objective(cfg: DictConfig):
    """The Pyro ELBO cfg.objective names (infer.objectives.make_objective); its other keys are its options.
    K (iwae) is the particle count in place of train.num_particles."""
    from infer.objectives import ObjectiveError, make_objective

    options = {k: v for k, v in OmegaConf.to_container(cfg.objective).items() if k not in ("name", "K")}
    particles = cfg.objective.K if "K" in cfg.objective else cfg.train.num_particles
    try:
        return make_objective(cfg.objective.name, particles, **options)
    except ObjectiveError as err:
        raise ConfigError(f"objective.{err}") from None


def progress_enabled(cfg, multirun: bool) -> bool:
    if cfg.train.progress == "auto":
        return sys.stderr.isatty() and not multirun
    return bool(cfg.train.progress)


def run(cfg: DictConfig, out: Path, multirun: bool = False) -> dict:
    """Train the configured model/guide pair, evaluate it, write its outputs into `out`; return the metrics.
    Raises ConfigError (or another ValueError naming the problem) before training on any bad input."""
    validate(cfg)
    import torch

    torch.set_num_threads(cfg.threads)
    import pyro

    from analysis.report import evaluate_run, write_run
    from infer import fit
    from infer.checkpoint import load_checkpoint

    pyro.set_rng_seed(cfg.seed)
    data, model, guide = build(cfg)
    elbo = build_objective(cfg)  # fit() refuses an objective that is invalid for the guide, before training
    resume = load_checkpoint(cfg.train.resume) if cfg.train.resume else None
    out.mkdir(parents=True, exist_ok=True)
    result = fit(model, guide, data, elbo=elbo, steps=cfg.train.steps, lr=cfg.optim.lr,
                 lr_final=cfg.optim.lr_final, schedule=cfg.optim.schedule, adam_betas=tuple(cfg.optim.betas),
                 beta=cfg.train.beta, warmup=cfg.train.warmup, warmup_start=cfg.train.warmup_start,
                 seed=cfg.seed, log_every=cfg.train.log_every, progress=progress_enabled(cfg, multirun),
                 resume=resume, checkpoint_path=out / "checkpoint.pt", checkpoint_every=cfg.train.checkpoint_every)
    metrics, grids = evaluate_run(model, guide, data, cfg, result)
    write_run(out, model, guide, data, result, metrics, grids, figures=cfg.eval.figures,
              title=f"{cfg.model.name} + {cfg.guide.name}, n={data.n}, seed={cfg.seed}")
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra task: run() into Hydra's output dir, log the summary, return the final loss (for sweepers)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    try:
        metrics = run(cfg, Path(hc.runtime.output_dir), multirun=multirun)
    except ValueError as err:  # ConfigError, GuideMismatchError, CheckpointError, bad library arguments
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    from analysis.report import summary_lines

    for line in summary_lines(metrics):
        log.info(line)
    return metrics["loss"]


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
