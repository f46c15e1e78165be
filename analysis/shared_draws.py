"""The fixed-seed draws of one evaluation, made once: exact(), surgery() and posterior_grid() each place their
integration ranges from draws of the guide and the model prior (Densities.samples: 4096 per data point, seed 0,
with the prior draws' log-likelihoods over all n bits), the same for the same settings and dtype (the quadratures
run on float64 copies of float32 networks, posterior_grid on the networks as they are). Inside shared_draws()
(analysis.report.evaluate) the first call with a key computes them and every later call gets the same tensors;
outside it, every call computes its own. The draws are read, never written, by their users."""
import contextlib
import contextvars

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
