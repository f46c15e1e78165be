"""The one-bit data distribution: x0 = 0^n and x1 = 1^n with weights (w0, w1)."""
import math
from dataclasses import dataclass

import torch

from infer.validate import check


@dataclass(frozen=True)
class OneBit:
    """The data set *is* the distribution: two points with weights; nothing is sampled or tiled."""

    n: int
    weights: tuple = (0.5, 0.5)

    def __post_init__(self):
        check("n", self.n)
        unordered = isinstance(self.weights, (str, bytes, set, frozenset, dict))  # a set's order is an accident
        try:
            weights = self.weights if unordered else tuple(self.weights)
        except TypeError:  # not iterable (None, a number): refused by name below
            weights = self.weights
        check("weights", weights)
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "weights", tuple(float(v) for v in weights))

    @property
    def x(self) -> torch.Tensor:
        """The two data points as a (2, n) tensor: row 0 is 0^n, row 1 is 1^n."""
        return torch.stack([torch.zeros(self.n), torch.ones(self.n)])

    @property
    def w(self) -> torch.Tensor:
        """The data weights as a (2,) tensor."""
        return torch.tensor(self.weights)

    @property
    def entropy(self) -> float:
        """H(w) in nats: the floor of every loss (ln 2 for equal weights)."""
        return -sum(v * math.log(v) for v in self.weights)
