"""The fast path's one Pyro handler for one ELBO step (StepHandler): data weights, beta, noise and replay in a
single messenger, with the general path's arithmetic and RNG calls (infer.elbo.ClosedFormELBO.fast_terms uses it)."""
from collections import OrderedDict

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample


class _Sites:
    """The sample sites of one run, in order, as a trace's `nodes` (what ClosedFormELBO._terms reads)."""

    def __init__(self):
        self.nodes = OrderedDict()


def weights_summary(weights) -> tuple:
    """(mean weight, whether all weights are equal) of the data weights."""
    return float(weights.mean()), bool(torch.allclose(weights, weights.mean()))


class StepHandler(Messenger):
    """The fast path's one handler for one step, in place of trace, replay, DataWeights, LatentScale and the noise
    handler: in the guide run (`guide` None) it scales every sample site by its data weight (and latent sites by
    beta), draws Gaussian noise through `noise` and records the sites; in the model run (`guide` = the guide's
    sites) it scales the same way, replays the guide's latent values and records the sites. The scales, values and
    draws are those of the general path (same handlers' arithmetic, same RNG calls in the same order)."""

    def __init__(self, weights, beta, noise, guide=None, plate="data", summary=None):
        super().__init__()
        self.w, self.beta, self.noise, self.guide, self.plate = weights, beta, noise, guide, plate
        self.mean_w, self.equal = summary if summary is not None else weights_summary(weights)
        self._w_at = {}
        self.sites = _Sites()

    def _pyro_sample(self, msg):
        if site_is_subsample(msg):
            return
        frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate), None)
        if frame is not None:
            w = self._w_at.get(frame.dim)
            if w is None:
                w = self._w_at[frame.dim] = (self.w.reshape((-1,) + (1,) * (-frame.dim - 1))
                                              if frame.dim is not None else self.w)
            scale = msg["scale"]  # 1.0 * w is w: one op fewer per site in the traced plan
            msg["scale"] = w if not torch.is_tensor(scale) and scale == 1.0 else scale * w
        elif self.equal:
            msg["scale"] = msg["scale"] * self.mean_w
        else:
            raise ValueError(f"site '{msg['name']}' lies outside the '{self.plate}' plate, so it couples the data "
                             "points; that needs equal data weights")
        if (torch.is_tensor(self.beta) or self.beta != 1.0) and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta
        if self.guide is None:
            if self.noise is not None:
                self.noise._pyro_sample(msg)
        elif not msg["is_observed"]:
            guide_msg = self.guide.nodes.get(msg["name"])
            if guide_msg is not None:
                msg["done"], msg["value"], msg["infer"] = True, guide_msg["value"], guide_msg["infer"]

    def _pyro_post_sample(self, msg):
        if not site_is_subsample(msg):
            self.sites.nodes[msg["name"]] = msg
