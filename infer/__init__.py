"""Inference: the objectives, the training recipes and the SVI training loop."""
from . import validate  # noqa: F401  (first: models and guides import it, and it imports nothing of ours)
from .elbo import ClosedFormELBO
from .fit import fit
from .recipe import Recipe, recipe
from .result import DivergenceError, FitResult
from .objectives import IWAE, OBJECTIVES, check_objective, make_objective
from .weights import weighted

__all__ = ["ClosedFormELBO", "fit", "FitResult", "DivergenceError", "Recipe", "recipe", "weighted",
           "make_objective", "check_objective", "IWAE", "OBJECTIVES"]
