"""Polyak-Ruppert averaging: the parameters a run ends with are the mean of its iterates over its last steps.

Late in a run the learning rate is small and the iterates wander around one optimum on the gradient noise (the
dlgm's chaotic training moves its final exact loss by several thousandths from one log step to the next). The
mean of the iterates over the last `fraction` of the steps lies closer to that optimum than the last iterate does:
measured for the dlgm at n = 1000 (README, "The DLGM at n = 1000"), seeds 0-4, the mean over the last 10% had exact
loss 0.7159-0.7189 where the last iterates had 0.7172-0.7218.

Correctness conditions: the averaged iterates must lie in one basin (a small, decaying learning rate over the
averaged steps); every parameter is averaged, so a parameter with a constraint must be an unconstrained one (the
param store's unconstrained values are what fit trains). The mean is a float32 running mean,
m_k = m_{k-1} + (p_k - m_{k-1}) / k, one fused pass over the params per step.
"""
import math

import torch

from .validate import check


def average_start(steps: int, fraction: float) -> int:
    """The number of steps after which the averaging starts: the last ceil(fraction * steps) steps are averaged
    (none for fraction 0)."""
    check("average", fraction)
    return steps - math.ceil(fraction * steps)


class ParameterAverage:
    """The running mean of `params` over the steps after `start` (steps counted from 1, as infer.fit counts them
    when it updates the mean after each optimizer step)."""

    def __init__(self, params, start: int):
        self.params, self.start = list(params), int(start)
        self._values = [p.detach() for p in self.params]  # views that follow the in-place updates
        self.means, self.count = None, 0

    def update(self, step: int) -> None:
        """Add the params after step `step` (1-based) to the mean, where step > start."""
        if step <= self.start:
            return
        self.count += 1
        with torch.no_grad():
            if self.means is None:
                self.means = [v.clone() for v in self._values]
            else:
                torch._foreach_lerp_(self.means, self._values, 1.0 / self.count)

    def apply(self) -> bool:
        """Put the mean into the params (in place); False (params untouched) where nothing was averaged."""
        if self.means is None:
            return False
        with torch.no_grad():
            for p, m in zip(self.params, self.means):
                p.copy_(m)
        return True

    def state(self, means=None):
        """A checkpointable copy: {'start', 'count', 'means': [tensors on the CPU]}, or None before the averaging
        starts. `means` (a function of the list of running means) lays them out otherwise, e.g. as one replica's."""
        if self.means is None:
            return None
        laid_out = means(self.means) if means is not None else self.means
        return {"start": self.start, "count": self.count, "means": [m.detach().cpu().clone() for m in laid_out]}

    def load(self, state, device, step: int) -> None:
        """Restore state() for a run resumed at `step` (None: nothing averaged yet). A mean that started elsewhere
        (the step budget grew on resume, so the window moved) is dropped, and the mean starts afresh at `step` if
        that lies inside the new window: the average then covers the steps this run still makes."""
        self.means, self.count = None, 0
        if state and int(state.get("start", -1)) == self.start:
            if len(state["means"]) != len(self.params) or any(
                    tuple(m.shape) != tuple(p.shape) for m, p in zip(state["means"], self.params)):
                raise ValueError("resume: the checkpoint's parameter average does not fit these params; it was "
                                 "written for another model or guide")
            self.count = int(state["count"])
            self.means = [m.to(device=p.device, dtype=p.dtype).clone() for m, p in zip(state["means"], self.params)]
        elif step > self.start:
            self.start = step


__all__ = ["ParameterAverage", "average_start"]
