"""Guides: any callable guide(x) that samples the model's latent sites. Ours take the model they serve."""
from .check import GuideMismatchError, check_guide
from .flow import FlowGuide
from .gaussian import GaussianGuide
from .meanfield import MeanFieldGuide
from .structured import StructuredGuide

__all__ = ["GaussianGuide", "FlowGuide", "StructuredGuide", "MeanFieldGuide", "check_guide", "GuideMismatchError"]
