"""KL weights: beta-scaling of the latent sites of model and guide, and a linear warm-up of beta."""
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample


class LatentScale(Messenger):
    """Multiplies the scale of every latent sample site by `beta`, in the model and the guide alike, so every
    KL term is weighted by beta while recon keeps weight 1. `beta` may change between steps (warm-up)."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def _pyro_sample(self, msg):
        if self.beta != 1.0 and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = msg["scale"] * self.beta


def kl_weight(step: int, beta: float = 1.0, warmup: int = 0, start: float = 0.0) -> float:
    """The KL weight at `step`: rises linearly from start * beta to beta over the first `warmup` steps."""
    if warmup <= 0 or step >= warmup:
        return beta
    return beta * (start + (1.0 - start) * step / warmup)
