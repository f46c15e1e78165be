"""The data distribution and the generative models, as Pyro functions over torch modules.

Importing onebit sets torch to one thread (unless ONEBIT_THREADS says otherwise): for these small networks one
thread measured 5-8x faster than two, in training and in evaluation alike, so a notebook gets the fast setting
without knowing it. Call torch.set_num_threads after the import to change it."""
import os

import torch

from .data import OneBit
from .dlgm import DLGM
from .vae import VAE

torch.set_num_threads(int(os.environ.get("ONEBIT_THREADS", "1")))

__all__ = ["OneBit", "VAE", "DLGM"]
