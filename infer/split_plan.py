"""The data-split plan: the joint graph of a training step traced once per half of the data points, the halves'
loss terms, objectives and gradients summed, so that two threads can run one half each.

A step of the dlgm at n = 1000 is arithmetic on (particles, data, n) tensors, and torch's intra-op threads cannot
share it out (its ops are too small to split; measured: two threads slower than one). Its objective is a sum over
the data points, so it splits into two independent graphs of half the size. TorchScript's torch.jit.fork runs the
second half on torch's inter-op thread pool while the calling thread runs the first, with no Python (and no GIL)
in between: measured 3.6-3.8 ms against 6.2-6.7 ms for the two halves one after the other (dlgm, n = 1000).

The numbers do not depend on the thread count: each half computes the same ops in either case, and the sums are
taken in the same order (Halves.agrees checks the forked run against the serial one, bit for bit, before a fit
uses it). They are not the joint graph's bits: a gradient summed over all the rows of one matmul rounds differently
from the sum of two halves' (a step's terms agree to about 1e-7); infer.fit checks them against the eager fast
path like any traced plan.
"""
import contextlib
from typing import List

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .plan import params_as_inputs

SPLIT_MIN_ELEMENTS = 1 << 17  # particles x data points x data dims: the size of the step's largest tensors (the
# decoder's logits) from which it is split (the dlgm at n = 1000: 128 x 2 x 1000); below it, a half's ops are too
# small to keep a second thread busy, and the plan stays one graph (and its numbers as they were)
PLATE = "data"  # the plate whose points the halves take (infer.fast_step.StepHandler's)


def splits(elbo, model, guide, x, weights) -> bool:
    """Whether the step's objective is a sum of one term per data point that is worth splitting: free bits off (its
    floor is taken over the sum), at least two data points, particles x x.numel() >= SPLIT_MIN_ELEMENTS, and every
    sample site of the guide and of the model (replayed) inside the data plate (a global site would be counted by
    both halves). Guide and model run once here, on a forked RNG."""
    if elbo.free_bits or x.dim() < 1 or x.shape[0] < 2 or len(weights) != x.shape[0]:
        return False
    if elbo.num_particles * x.numel() < SPLIT_MIN_ELEMENTS:
        return False
    try:
        with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    except Exception:  # noqa: BLE001  a model or guide that does not run unvectorised: the plan stays whole
        return False
    return all(any(frame.name == PLATE for frame in site["cond_indep_stack"])
               for trace in (guide_trace, model_trace) for site in trace.nodes.values()
               if site["type"] == "sample" and not site_is_subsample(site))


class _Listed(torch.nn.Module):
    """A joint graph with the params as its leading inputs, taking them as one list and returning a list."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def forward(self, params: List[torch.Tensor], noise: torch.Tensor, beta: torch.Tensor):
        return list(self.graph(*params, noise, beta))


class _Serial(torch.nn.Module):
    """Both halves on the calling thread, one after the other; their outputs summed."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, params: List[torch.Tensor], noise: torch.Tensor, beta: torch.Tensor) -> List[torch.Tensor]:
        a = self.first(params, noise, beta)
        b = self.second(params, noise, beta)
        return [u + v for u, v in zip(a, b)]


class _Forked(_Serial):
    """The second half on torch's inter-op thread pool while the calling thread runs the first; the same sums."""

    def forward(self, params: List[torch.Tensor], noise: torch.Tensor, beta: torch.Tensor) -> List[torch.Tensor]:
        future = torch.jit.fork(self.second, params, noise, beta)
        a = self.first(params, noise, beta)
        b = torch.jit.wait(future)
        return [u + v for u, v in zip(a, b)]


class Halves:
    """The plan's graph for a split step: called as the joint graph is, (noise, beta) -> [means, loss, *grads],
    the sums of the two halves'. `parallel` (set by on_threads) runs them on two threads."""

    def __init__(self, first, second, params):
        self.params, self.parallel = params, False
        self._serial = torch.jit.script(_Serial(first, second))
        self._forked = torch.jit.script(_Forked(first, second))

    def __call__(self, noise, beta):
        return (self._forked if self.parallel else self._serial)(self.params, noise, beta)

    def agrees(self, args) -> bool:
        """Whether the forked run gives the serial run's outputs bit for bit on these inputs (no gradients kept)."""
        with torch.no_grad():
            serial = self._serial(self.params, *args)
            forked = self._forked(self.params, *args)
        return len(serial) == len(forked) and all(torch.equal(a, b) for a, b in zip(serial, forked))


def halves_of(trace, x, weights, reached, whole, example):
    """Halves of the step, or None where they cannot be made or do not add up to the whole step: trace(xs, ws) ->
    (graph module, reached) traces the joint step on a part of the data; both parts must reach the params the
    whole step reaches, take them in the same order, and their summed outputs on `example` ((noise, beta) inputs)
    must agree with the whole graph's (`whole`, called the same way) to rtol 1e-5 (a model or guide that does not
    take its plate's size from the data, say, fails here and keeps the whole graph)."""
    half = (x.shape[0] + 1) // 2
    try:
        parts = [trace(x[:half], weights[:half]), trace(x[half:], weights[half:])]
        if any(r != reached for _, r in parts):
            return None
        (first, params), (second, other) = [params_as_inputs(module) for module, _ in parts]
        if len(params) != len(other) or any(p is not q for p, q in zip(params, other)):
            return None
        traced = [torch.jit.trace(_Listed(module), (params, *example), check_trace=False, strict=False)
                  for module in (first, second)]
        halves = Halves(*traced, params)
        with torch.no_grad():
            got, want = halves(*example), list(whole(*example))
    except Exception:  # noqa: BLE001  the whole step's graph runs instead
        return None
    agree = len(got) == len(want) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(b.abs().max())))
        for a, b in zip(got, want))
    return halves if agree else None


@contextlib.contextmanager
def on_threads(plan, args):
    """While a fit trains on `plan`: where it is split, torch has two or more threads and the process two or more
    cores, one half per thread (Halves.parallel) and torch's own ops on one thread within each (no thread waits on
    another inside an op), provided a check on `args` (a step's inputs) gives the serial bits; restored
    afterwards."""
    from .runtime import available_cores

    halves, threads = getattr(plan, "halves", None), torch.get_num_threads()
    if halves is None or threads < 2 or available_cores() < 2:
        yield
        return
    torch.set_num_threads(1)
    try:
        halves.parallel = halves.agrees(args)
        yield
    finally:
        halves.parallel = False
        torch.set_num_threads(threads)


__all__ = ["SPLIT_MIN_ELEMENTS", "Halves", "halves_of", "on_threads", "splits"]
