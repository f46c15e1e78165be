"""Speed benchmarks, printed as ratios measured in one run (not a test: `python tests/benchmarks.py`).

1. fit()'s loop against Pyro's SVI.step on the same ClosedFormELBO (the same gradients).
2. The noise schemes: mc, qmc (scrambled Sobol) and lattice, per step.
3. Two torch threads against one.
Model: the DLGM at n = 1000 with 128 particles (the acceptance recipe), and the VAE with 32.
"""
import time

import pyro
import torch

from guides import GaussianGuide, StructuredGuide
from infer import ClosedFormELBO, fit, weighted
from models import DLGM, VAE, OneBit

STEPS = 200


def pair(name, n):
    pyro.set_rng_seed(0)
    if name == "vae":
        model = VAE(n, hidden=32, gain=True)
        return model, GaussianGuide(model, hidden=32)
    model = DLGM(n, prior_gain=True)
    return model, StructuredGuide(model, gain=True)


def fit_ms(name, particles, noise="lattice", threads=1):
    torch.set_num_threads(threads)
    model, guide = pair(name, 1000)
    result = fit(model, guide, OneBit(1000), elbo=ClosedFormELBO(num_particles=particles, noise=noise), steps=STEPS)
    return 1e3 * result.wall_seconds / STEPS


def svi_ms(name, particles, noise="lattice"):
    torch.set_num_threads(1)
    model, guide = pair(name, 1000)
    data = OneBit(1000)
    pyro.clear_param_store()
    svi = pyro.infer.SVI(weighted(model, data), weighted(guide, data), pyro.optim.Adam({"lr": 3e-3}),
                         ClosedFormELBO(num_particles=particles, noise=noise))
    svi.step(data.x)
    t0 = time.perf_counter()
    with pyro.validation_enabled(False):
        for _ in range(STEPS):
            svi.step(data.x)
    return 1e3 * (time.perf_counter() - t0) / STEPS


def main():
    for name, particles in (("vae", 32), ("dlgm", 128)):
        ours, svi = fit_ms(name, particles), svi_ms(name, particles)
        print(f"{name} (P={particles}): fit {ours:.2f} ms/step, SVI.step {svi:.2f} ms/step, ratio SVI/fit {svi / ours:.2f}")
        times = {noise: fit_ms(name, particles, noise) for noise in ("mc", "qmc", "lattice")}
        print(f"{name}: per-step time relative to mc: "
              + ", ".join(f"{k} {v / times['mc']:.2f}" for k, v in times.items()))
        two = fit_ms(name, particles, threads=2)
        print(f"{name}: 2 threads / 1 thread step time: {two / times['lattice']:.2f}")


if __name__ == "__main__":
    main()
