"""Guides: any callable guide(x) that samples the model's latent sites. Ours take the model they serve."""
from .check import GuideMismatchError, check_guide
from .flow import FlowGuide
from .gaussian import GaussianGuide
from .meanfield import MeanFieldGuide
from .mixture import MixtureGuide, NormalMixture1D
from .structured import StructuredGuide

__all__ = ["GaussianGuide", "FlowGuide", "StructuredGuide", "MeanFieldGuide", "MixtureGuide", "NormalMixture1D",
           "check_guide", "GuideMismatchError"]
