"""The fixed-seed draws of one evaluation, made once: exact(), surgery() and posterior_grid() each place their
integration ranges from draws of the guide and the model prior (Densities.samples: 4096 per data point, seed 0,
with the prior draws' log-likelihoods over all n bits), the same for the same settings and dtype (the quadratures
run on float64 copies of float32 networks, posterior_grid on the networks as they are). Inside shared_draws()
(analysis.report.evaluate) the first call with a key computes them and every later call gets the same tensors;
outside it, every call computes its own. The draws are read, never written, by their users. sample_range turns
draws into an integration range."""
import contextlib
import contextvars

import torch

_DRAWS = contextvars.ContextVar("onebit_shared_draws", default=None)


@contextlib.contextmanager
def shared_draws():
    """Within this block, draws() computes each key once. Correct only while the model, the guide and the data stay
    the same (one evaluation of one trained pair): the key names the draws' settings, not the networks."""
    token = _DRAWS.set({})
    try:
        yield
    finally:
        _DRAWS.reset(token)


def draws(key: tuple, compute) -> dict:
    """compute() (a dict of tensors), or the dict an earlier call with the same key returned inside shared_draws()."""
    cache = _DRAWS.get()
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return dict(cache[key])


def sample_range(draws: torch.Tensor, pad: float = 10.0) -> tuple:
    """(lo, hi) covering draws (count, ...) beyond their 0.1% / 99.9% quantiles by `pad` robust standard deviations."""
    d = draws.reshape(-1)
    d = d[torch.isfinite(d)]
    q = torch.quantile(d, torch.tensor([0.001, 0.16, 0.84, 0.999], dtype=d.dtype))
    s = max(float(q[2] - q[1]) / 2, 1e-3)
    return float(q[0]) - pad * s, float(q[3]) + pad * s
