"""Inference: the objectives and the SVI training loop."""
from .elbo import ClosedFormELBO
from .fit import FitResult, fit, weighted
from .objectives import IWAE, OBJECTIVES, check_objective, make_objective

__all__ = ["ClosedFormELBO", "fit", "FitResult", "weighted", "make_objective", "check_objective", "IWAE",
           "OBJECTIVES"]
