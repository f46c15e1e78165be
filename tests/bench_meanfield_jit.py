"""Step time of JitTraceMeanField_ELBO against TraceMeanField_ELBO on the 1-layer VAE (pyro 1.9.2).

    python tests/bench_meanfield_jit.py [n] [steps]

Pyro 1.9.2's JitTraceMeanField_ELBO caches its traced loss as `_differentiable_loss` but checks
`_loss_and_surrogate_loss`, so it re-traces on every step. This prints the measured ratio; infer/objectives.py
offers the jitted variant only if it is faster."""
import sys
import time
import warnings

import pyro
import torch
from pyro.infer import JitTraceMeanField_ELBO, TraceMeanField_ELBO

from guides import GaussianGuide
from infer import weighted
from models import VAE, OneBit


def step_time(elbo_class, n: int, steps: int, particles: int = 32) -> float:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data, model = OneBit(n), VAE(n, hidden=32)
    guide = GaussianGuide(model, hidden=32)
    elbo = elbo_class(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    m, g = weighted(model, data), weighted(guide, data)
    elbo.loss_and_grads(m, g, data.x)  # first step: creates params (and the first trace)
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad()
            elbo.loss_and_grads(m, g, data.x)
            optimizer.step()
    return (time.perf_counter() - t0) / steps


if __name__ == "__main__":
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    plain = step_time(TraceMeanField_ELBO, n, steps)
    jit = step_time(JitTraceMeanField_ELBO, n, steps)
    print(f"vae n={n}, 32 particles, {steps} steps: TraceMeanField_ELBO {1e3 * plain:.2f} ms/step, "
          f"JitTraceMeanField_ELBO {1e3 * jit:.2f} ms/step, ratio jit/plain {jit / plain:.1f}x")
