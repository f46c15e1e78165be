"""Small torch networks shared by models and guides. They broadcast over leading batch dims."""
import torch
from torch import nn
from torch.nn import functional as F

from infer.validate import check

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "softplus": nn.Softplus}


def floored(log_gain: torch.Tensor, floor) -> torch.Tensor:
    """max(log_gain, floor) in value, with the gradient of log_gain itself (straight-through); log_gain where floor
    is None. Below the floor the parameter still gets the gradient an unfloored gain would get, so it climbs back
    over the floor as soon as a steeper map pays, instead of sticking where the clamp's zero gradient left it."""
    if floor is None:
        return log_gain
    return log_gain + (log_gain.clamp(min=floor) - log_gain).detach()


class LogGain(nn.Module):
    """h -> h * exp(max(rate * g, floor)), with one learnable g per input (initialised to 0, gain 1): Adam then
    changes the scale of the input multiplicatively, so a network can become steep (slopes in the hundreds) in a few
    thousand steps. rate multiplies the speed at which Adam moves the log-gain (Adam's step in g is about lr whatever
    the gradient's size, so the log-gain moves about rate * lr per step). floor (None: none) is the lowest log-gain
    the forward uses (0: the map never gets flatter in its input than at initialisation; see `floored`)."""

    def __init__(self, dim: int, rate: float = 1.0, floor: float = None):
        super().__init__()
        check("gain_rate", rate)
        check("gain_floor", floor)
        self.rate = float(rate)
        self.floor = None if floor is None else float(floor)
        self.log_gain = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self):
        """Back to gain 1 (log-gain 0), as built."""
        with torch.no_grad():
            self.log_gain.zero_()

    def forward(self, h):
        return h * floored(self.rate * self.log_gain, self.floor).exp()


def mlp(in_dim: int, out_dim: int, hidden: int, layers: int, activation: str = "elu", gain: bool = False,
        gain_rate: float = 1.0, gain_floor: float = None) -> nn.Sequential:
    """A dense network with `layers` hidden layers of width `hidden` and a linear output; `gain` puts a LogGain
    (of rate gain_rate and floor gain_floor) on its input."""
    for name, value in (("hidden", hidden), ("layers", layers), ("activation", activation)):
        check(name, value)
    for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name}={value!r} is not allowed: {name} must be an integer >= 1")
    try:
        blocks, width = ([LogGain(in_dim, gain_rate, gain_floor)] if gain else []), in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            width = hidden
        blocks.append(nn.Linear(width, out_dim))
    except RuntimeError as err:  # torch cannot allocate the weights (or even count their bytes)
        if "alloc" not in str(err) and "overflow" not in str(err):
            raise
        why = "its size overflows" if "overflow" in str(err) else "out of memory"
        raise ValueError(f"hidden={hidden} is not allowed: a network {in_dim} -> {layers} x {hidden} -> {out_dim} "
                         f"cannot be allocated (torch: {why}); lower hidden") from None
    return nn.Sequential(*blocks)


class GaussianNet(nn.Module):
    """Maps an input h to the (loc, scale) of a diagonal Gaussian N(loc(h), scale(h)^2)."""

    def __init__(self, in_dim, out_dim, hidden, layers, activation="elu", min_scale=1e-5, gain=False, gain_rate=1.0,
                 gain_floor=None):
        super().__init__()
        check("min_scale", min_scale)
        self.body = mlp(in_dim, 2 * out_dim, hidden, layers, activation, gain, gain_rate, gain_floor)
        self.min_scale = min_scale

    def forward(self, h: torch.Tensor):
        loc, raw = self.body(h).chunk(2, dim=-1)
        return loc, F.softplus(raw) + self.min_scale
