"""The one-bit data distribution: x0 = 0^n and x1 = 1^n with weights (w0, w1)."""
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OneBit:
    """The data set *is* the distribution: two points with weights; nothing is sampled or tiled."""

    n: int
    weights: tuple = (0.5, 0.5)

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        w = tuple(float(v) for v in self.weights)
        if len(w) != 2 or min(w) <= 0 or abs(sum(w) - 1) > 1e-9:
            raise ValueError(f"weights must be two positive numbers that sum to 1, got {list(self.weights)!r}")
        object.__setattr__(self, "weights", w)

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
