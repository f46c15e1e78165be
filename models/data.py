"""The one-bit data distribution: x0 = 0^n and x1 = 1^n with weights (w0, w1)."""
import math
from dataclasses import dataclass

import torch

from infer.validate import allowed, check, is_allowed, refuse


def array_numbers(values) -> tuple:
    """values as a tuple: a 1-D torch tensor or numpy array of real numbers (float or integer dtype) as Python
    floats, each the shortest decimal that rounds to it in its dtype (a float32 tensor([0.1, 0.9]) gives (0.1, 0.9),
    the numbers it was made from, which sum to 1 as their float32 roundings do not); any other array-like as
    tuple(values) (its elements are then checked as they are). Raises TypeError where values is not iterable."""
    import numpy as np

    if isinstance(values, torch.Tensor):
        values = (values.float() if values.dtype == torch.bfloat16 else values).detach().cpu().numpy()
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "fiu":
        return tuple(float(str(v)) for v in values)
    return tuple(values)


@dataclass(frozen=True)
class OneBit:
    """The data set *is* the distribution: two points with weights; nothing is sampled or tiled.

    weights: two positive finite numbers that sum to 1 (within 1e-9), as a tuple or list, or a 1-D torch tensor or
    numpy array of two (array_numbers); anything else is refused in one line (ValueError naming weights)."""

    n: int
    weights: tuple = (0.5, 0.5)

    def __post_init__(self):
        check("n", self.n)
        unordered = isinstance(self.weights, (str, bytes, set, frozenset, dict))  # a set's order is an accident
        try:
            weights = self.weights if unordered else array_numbers(self.weights)
        except TypeError:  # not iterable (None, a number): refused by name below
            weights = self.weights
        if not is_allowed("weights", weights):  # named as the caller passed it
            raise refuse("weights", self.weights, f"weights must be {allowed('weights')}, as a tuple, a list, or a 1-D "
                                                  "tensor or array")
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
