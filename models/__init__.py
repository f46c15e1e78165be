"""The data distribution and the generative models, as Pyro functions over torch modules."""
from .data import OneBit
from .dlgm import DLGM
from .vae import VAE

__all__ = ["OneBit", "VAE", "DLGM"]
