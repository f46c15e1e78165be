"""The data distribution and the generative models, as Pyro functions over torch modules.

Importing onebit sets torch to one thread (unless ONEBIT_THREADS says otherwise): for these small networks one
thread measured 5-8x faster than two, in training and in evaluation alike, so a notebook gets the fast setting
without knowing it. Call torch.set_num_threads after the import to change it."""
import torch

from infer.validate import env_threads

from .data import OneBit
from .dlgm import DLGM
from .vae import VAE

torch.set_num_threads(env_threads())  # ValueError in one line for an ONEBIT_THREADS that is not a thread count

__all__ = ["OneBit", "VAE", "DLGM"]
