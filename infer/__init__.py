"""Inference: the objectives and the SVI training loop."""
from .elbo import ClosedFormELBO
from .fit import FitResult, fit, weighted

__all__ = ["ClosedFormELBO", "fit", "FitResult", "weighted"]
