"""Replicas: R independently seeded copies of one model and guide, stacked into one model and one guide whose
networks carry the replicas as a leading batch dimension, so that one step trains all R.

stack(modules) builds the stacked module: each nn.Linear of the R copies becomes one ReplicaLinear (weights
(R, out, in), one batched matmul), each models.nets.LogGain one ReplicaLogGain; activations and the Pyro code of
the model and guide are unchanged, because every tensor then carries the replica dim on the left of the particle
dim: x enters as (R, 1, N, n), the noise as (R, P, 1, d) (infer.noise.SobolNoise with replicas=R), and each loss
term comes out per replica and particle, (R, P). ReplicaELBO sums the R objectives: the gradient of the sum with
respect to replica r's parameters is replica r's own gradient, and Adam is elementwise, so the replicas train
independently, exactly as R separate runs would (up to floating-point rounding of the batched matmul).

A module with parameters outside nn.Linear and LogGain layers, or with buffers, cannot take a replica dim:
stack() raises ValueError in one line naming it. infer.fit_replicas checks the stacked step against each
replica's own step before training.
"""
import copy

import torch
from torch import nn

from models.nets import LogGain, floored

from .elbo import ClosedFormELBO
from .noise import LATTICE_HALF_WIDTH
from .noise import SobolNoise


class ReplicaLinear(nn.Module):
    """R independent affine maps h_r -> h_r W_r^T + b_r, applied to h of shape (R, ..., in) by one batched matmul.

    The weights are stored transposed, (R, in, out), and the biases as (R, 1, out): the batched matmul and its
    gradients then need no transposed copies."""

    def __init__(self, layers):
        super().__init__()
        self.weight_t = nn.Parameter(torch.stack([layer.weight.detach().t() for layer in layers]).contiguous())
        bias = [layer.bias for layer in layers]
        self.bias = (nn.Parameter(torch.stack([b.detach() for b in bias]).unsqueeze(1).clone())
                     if bias[0] is not None else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R, in_dim, out_dim = self.weight_t.shape
        if h.dim() < 2 or h.shape[0] != R:
            raise ValueError(f"a replicated layer needs inputs of shape ({R}, ..., {in_dim}), got {tuple(h.shape)}")
        flat = h.reshape(R, -1, in_dim)
        out = (torch.bmm(flat, self.weight_t) if self.bias is None
               else torch.baddbmm(self.bias, flat, self.weight_t))
        return out.reshape(h.shape[:-1] + (out_dim,))

    def parts(self, r: int, of=None) -> dict:
        """{'weight': ..., 'bias': ...}: replica r's slices, shaped as its own nn.Linear's, of the parameters or of
        `of` ({param: tensor of its shape}, e.g. Adam's moments)."""
        of = of if of is not None else {p: p for p in self.parameters()}
        return {"weight": of[self.weight_t][r].t(), **({"bias": of[self.bias][r, 0]} if self.bias is not None else {})}


class ReplicaLogGain(nn.Module):
    """R independent log-gains: h_r -> h_r * exp(max(rate * g_r, floor)), applied to h of shape (R, ..., dim)."""

    def __init__(self, layers):
        super().__init__()
        self.log_gain = nn.Parameter(torch.stack([layer.log_gain.detach() for layer in layers]).clone())
        self.rate, self.floor = layers[0].rate, layers[0].floor  # copies of one architecture: one rate, one floor

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R, dim = self.log_gain.shape
        return h * floored(self.rate * self.log_gain, self.floor).exp().reshape((R,) + (1,) * (h.dim() - 2) + (dim,))

    def parts(self, r: int, of=None) -> dict:
        return {"log_gain": (of if of is not None else {self.log_gain: self.log_gain})[self.log_gain][r]}


REPLICATED = {nn.Linear: ReplicaLinear, LogGain: ReplicaLogGain}


def stack(modules):
    """One module that runs the R modules (copies of one architecture) at once, with a leading replica dim.
    Raises ValueError in one line for a module that cannot take a replica dim."""
    first = modules[0]
    if not isinstance(first, nn.Module):
        raise ValueError(f"{type(first).__name__} is not an nn.Module: only nn.Module models and guides can be "
                         "replicated")
    shapes = [[(name, tuple(p.shape)) for name, p in m.named_parameters()] for m in modules]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"the {len(modules)} copies of {type(first).__name__} differ in architecture")
    for name, buf in first.named_buffers():  # constants shared by every copy are fine; random ones are not
        if not all(torch.equal(buf, m.get_buffer(name)) for m in modules[1:]):
            raise ValueError(f"{type(first).__name__} cannot take a replica dimension: its buffer {name} differs "
                             "between the copies")
    stacked = copy.deepcopy(first)
    for name, sub in list(first.named_modules()):
        kind = next((k for k in REPLICATED if type(sub) is k), None)
        if kind is not None:
            layer = REPLICATED[kind]([m.get_submodule(name) for m in modules])
            parent, _, leaf = name.rpartition(".")
            setattr(stacked.get_submodule(parent) if parent else stacked, leaf, layer)
        elif list(sub.parameters(recurse=False)):
            raise ValueError(f"{type(first).__name__} cannot take a replica dimension: its {name or 'own'} "
                             f"{type(sub).__name__} holds parameters outside nn.Linear and LogGain layers")
    return stacked


def replica_parameters(stacked, r: int, of=None) -> dict:
    """{name: tensor}: replica r's parameters under the names of one copy's named_parameters() (views of the
    stacked parameters), or its slices of `of` ({stacked param: tensor of its shape})."""
    out = {}
    for name, sub in stacked.named_modules():
        if isinstance(sub, tuple(REPLICATED.values())):
            out.update({f"{name}.{k}" if name else k: v for k, v in sub.parts(r, of).items()})
    return out


def unstack(stacked, modules) -> None:
    """Copy each replica's parameters from the stacked module into its own module (in place)."""
    with torch.no_grad():
        for r, module in enumerate(modules):
            own = dict(module.named_parameters())
            for name, value in replica_parameters(stacked, r).items():
                own[name].copy_(value)


def replica_state(roles: dict, names, params, optimizer, r: int):
    """(params, optimizer state_dict) of replica r of the stacked modules `roles` ({'model': ..., 'guide': ...}),
    laid out as its single run's: the param store's names ((name, role, attr) in `names`) and Adam's state in the
    order of those params. `params` are the stack's params in the optimizer's order."""
    views = {role: replica_parameters(module, r) for role, module in roles.items()}
    own = {name: views[role][attr] for name, role, attr in names}
    state, moments = {}, {}
    for key in ("exp_avg", "exp_avg_sq"):
        of = {p: optimizer.state[p][key] for p in params if key in optimizer.state.get(p, {})}
        if len(of) == len(params):
            moments[key] = {role: replica_parameters(module, r, of) for role, module in roles.items()}
    if moments:  # Adam has stepped: one step count for every param
        step = optimizer.state[params[0]]["step"]
        for i, (_, role, attr) in enumerate(names):
            state[i] = {"step": step.clone(), **{k: m[role][attr].clone() for k, m in moments.items()}}
    group = {k: val for k, val in optimizer.state_dict()["param_groups"][0].items() if k != "params"}
    return own, {"state": state, "param_groups": [{**group, "params": list(range(len(names)))}]}


def replica_average(roles: dict, names, params, averaged, r: int):
    """Replica r's running parameter average (infer.average.ParameterAverage `averaged`, over the stack's params)
    as its single run's state(): the means in the order of its params; None before the averaging starts."""
    def own(means):
        of = dict(zip(params, means))
        views = {role: replica_parameters(module, r, of) for role, module in roles.items()}
        return [views[role][attr] for _, role, attr in names]

    return averaged.state(own)


class ReplicaELBO(ClosedFormELBO):
    """ClosedFormELBO over stacked models and guides (stack()): the terms per replica and particle, the particle
    means per replica ((T, R)), and the objective per replica ((R,)); training minimises their sum.

    The noise is lattice or qmc (drawn outside the model and guide, one torch.Generator per replica: `generators`),
    so that replica r's noise is what a single run's would be from the same RNG state."""

    def __init__(self, replicas: int, num_particles: int, noise: str = "lattice", closed_form: bool = True,
                 free_bits: float = 0.0):
        if noise not in ("lattice", "qmc"):
            raise ValueError(f"noise={noise!r} is not allowed with replicas: replicas need noise drawn outside the "
                             "model and guide (lattice or qmc)")
        super().__init__(num_particles=num_particles, closed_form=closed_form, vectorize_particles=True,
                         noise=noise, free_bits=free_bits)
        self.replicas, self.generators = replicas, None

    def _new_noise(self):
        noise = SobolNoise(self.num_particles, -self._dims, replicas=self.replicas,
                           lattice=LATTICE_HALF_WIDTH if self.noise == "lattice" else 0.0)
        noise.generators = self.generators
        return noise

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """The data as every replica sees it: (R, 1, N, n) (no copy)."""
        return x.expand((self.replicas, 1) + tuple(x.shape))

    def means(self, terms) -> torch.Tensor:
        out = []
        for name, t in terms.items():
            if t.dim() != 2 or t.shape[0] != self.replicas:
                raise ValueError(f"the loss term {name} has shape {tuple(t.shape)}, not (replicas, particles): the "
                                 "model or guide does not carry the replica dimension")
            out.append(t.mean(-1))
        return torch.stack(out)


__all__ = ["ReplicaLinear", "ReplicaLogGain", "ReplicaELBO", "stack", "unstack", "replica_parameters"]
