"""The training recipes: each model's default settings for fit and the command line, and the learning-rate
schedules a recipe names.

conf/model/*.yaml and conf/optim/adam.yaml must agree with the recipes (tests/test_fit.py checks that).
"""
import math
from dataclasses import dataclass

from .validate import SCHEDULES


@dataclass(frozen=True)
class Recipe:
    """A model's training recipe: the settings fit uses for every argument left unspecified, and the command
    line's defaults for the model (conf/model/<model>.yaml, conf/optim/adam.yaml)."""

    steps: int
    num_particles: int
    noise: str
    lr: float
    lr_final: float
    schedule: str
    betas: tuple
    average: float = 0.0  # the final parameters are the mean of the iterates over this last fraction of the steps


# 1-layer VAE: many cheap steps with few lattice particles (lattice noise: a randomised quadrature rule over the
# first Gaussian coordinate, which sees the costly tails every step)
VAE_RECIPE = Recipe(steps=8000, num_particles=32, noise="lattice", lr=3e-3, lr_final=3e-5, schedule="exponential",
                    betas=(0.9, 0.99))
# DLGM: more particles and more steps, a low final rate, Adam's long second-moment memory, and the mean of the last
# 10% of the iterates (infer.average); with its 3-layer prior net (models.DLGM) and infer.runtime's settings, 14000
# steps at n = 1000 took 55.8-59.9 s in this 2-core machine's fastest spell and up to 108 s in its slow ones
# (README, "The DLGM at n = 1000")
DLGM_RECIPE = Recipe(steps=14000, num_particles=128, noise="lattice", lr=3e-3, lr_final=3e-5,
                     schedule="exponential", betas=(0.9, 0.999), average=0.1)
# any other model
DEFAULT_RECIPE = Recipe(steps=10000, num_particles=128, noise="lattice", lr=3e-3, lr_final=3e-5,
                        schedule="exponential", betas=(0.9, 0.99))


def recipe(model) -> Recipe:
    """The training recipe of a model (an instance or a class): VAE_RECIPE, DLGM_RECIPE, else DEFAULT_RECIPE."""
    from models import DLGM, VAE

    cls = model if isinstance(model, type) else type(model)
    if issubclass(cls, DLGM):
        return DLGM_RECIPE
    if issubclass(cls, VAE):
        return VAE_RECIPE
    return DEFAULT_RECIPE


def learning_rate(step: int, steps: int, lr: float, lr_final: float, schedule: str) -> float:
    """The learning rate at `step` of `steps`: lr decays to lr_final exponentially or by a cosine, or stays."""
    t = min(step / max(steps, 1), 1.0)
    if schedule == "exponential":
        return lr * (lr_final / lr) ** t
    if schedule == "cosine":
        return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * t))
    if schedule == "constant":
        return lr
    raise ValueError(f"schedule={schedule!r} is not allowed: schedule must be one of {', '.join(SCHEDULES)}")


__all__ = ["Recipe", "recipe", "learning_rate", "VAE_RECIPE", "DLGM_RECIPE", "DEFAULT_RECIPE"]
