"""Site weights: the data weights, beta-scaling of the latent sites of model and guide, and a warm-up of beta."""
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample


class DataWeights(Messenger):
    """Scales every sample site inside the plate `plate` by the data weights w (one per data point, along that
    plate's dim), so a loss summed over the plate becomes sum_k w_k loss(x_k).

    A site outside the plate (a global latent, or a joint guide's auxiliary site such as an AutoContinuous
    guide's `_..._latent`, which couples the data points) gets the mean weight 1/N when the weights are equal:
    the joint ELBO of the N points divided by N, which bounds sum_k w_k log p(x_k). With unequal weights no such
    bound exists, and such a site raises ValueError."""

    def __init__(self, w, plate: str = "data"):
        super().__init__()
        self.w, self.plate = torch.as_tensor(w), plate
        self.equal = bool(torch.allclose(self.w, self.w.mean()))

    def _pyro_sample(self, msg):
        frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate), None)
        if frame is not None:
            w = self.w.reshape((-1,) + (1,) * (-frame.dim - 1)) if frame.dim is not None else self.w
            msg["scale"] = msg["scale"] * w
        elif site_is_subsample(msg):
            return
        elif self.equal:
            msg["scale"] = msg["scale"] * float(self.w.mean())
        else:
            raise ValueError(f"site '{msg['name']}' lies outside the '{self.plate}' plate, so it couples the data "
                             f"points; that needs equal data weights, got {[round(float(v), 6) for v in self.w]}")


def weighted(fn, data, device=None):
    """fn with every site scaled by the data weights: the loss becomes sum_k w_k (-ELBO(x_k)). Sites outside the
    data plate (a joint guide's auxiliary site) get weight 1/N for equal weights (see DataWeights)."""
    w = data.w if device is None else data.w.to(device)
    return DataWeights(w)(fn)


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
