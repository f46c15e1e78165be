"""Speed benchmarks, printed as ratios measured in one run (not a test: `python tests/benchmarks.py [rounds]
[--no-study]`).

The first line names the machine: its CPU and instruction sets, torch's kernel level, and a one-thread float32
matmul's speed (the machine's spell: the ratios below hold for the CPU they were measured on).

The ratio of fit()'s step time to a plain-torch step over the same networks (models.nets), the same particles, the
same closed-form terms and the same lattice noise, for the vae (32 particles) and the dlgm (128 particles) at
n = 1000: fit with engine="auto" (the fast path) and engine="general" (Pyro's trace and replay). The plain loop is
timed with torch's default Adam and with fused Adam (fit uses fused Adam). Rounds are interleaved, and the median
per-round ratio is printed, because the machine is shared: ratios, not absolute times.

Replicas: three seeds trained together (infer.fit_replicas) against the three single fits, for the vae and the dlgm
at n = 10, 100 and 1000, with their recipes' particles: the training time of a short run (setup included), the
steady step, and both extrapolated to the recipe's steps, the cost of three full runs' training.

Both cores: the dlgm at n = 1000 with threads=2 against threads=1 (a fit step), and its three replicas with 2 threads
against three single fits with 1 and with 2 (the same numbers: infer.runtime.serial_blas, batched_blas_threads).
Meaningful only on an otherwise idle machine (infer.runtime.oversubscription).

The study: the wall time of `python run.py -m +experiment=study hydra/launcher=joblib hydra.launcher.n_jobs=2`
(30 runs as 10 jobs of 3 replicas), run in a temporary directory, with its job count and failures.
"""
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guides import GaussianGuide, StructuredGuide  # noqa: E402
import importlib  # noqa: E402
from infer import ClosedFormELBO, fit, recipe  # noqa: E402
from infer.runtime import held_heap  # noqa: E402
from models import DLGM, VAE, OneBit  # noqa: E402

N, STEPS = 1000, 150  # STEPS: a multiple of WARMUP
SETUP, ENGINE, STACK_ENGINE = {"vae": [], "dlgm": []}, {}, {}
importlib.import_module("infer.engine").GRAPH_MIN_STEPS = 0  # the traced plan even for these short timing runs
from infer.noise import LATTICE_HALF_WIDTH as L  # noqa: E402  the lattice half width


def pair(name, n=N):
    """The recipe's networks (conf/model/*.yaml) and particles, at n."""
    pyro.set_rng_seed(0)
    if name == "vae":
        model = VAE(n, hidden=32, gain=True)
        return model, GaussianGuide(model, hidden=32), 32
    model = DLGM(n, prior_hidden=32, prior_layers=3, prior_gain=True, prior_gain_floor=0.0)
    return model, StructuredGuide(model), 128


def lattice(P):
    """A randomly shifted grid on [-L, L] with normalised weights phi(eps): the first noise coordinate."""
    h = 2 * L / P
    eps = -L + (torch.arange(P, dtype=torch.float64) + torch.rand((), dtype=torch.float64)) * h
    log_w = -0.5 * eps**2
    return eps.float().reshape(P, 1, 1), (log_w - torch.logsumexp(log_w, 0)).exp().float()


def recon(logits, x):
    """-log p(x|logits) summed over the n bits: (P, 2)."""
    return F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def plain_loss(name, model, guide, x, w, P):
    """The same objective as ClosedFormELBO(noise='lattice') in plain torch: sum_k w_k -ELBO(x_k), lattice-weighted
    over the first Gaussian coordinate; KL(q(z)||p(z)) closed form (vae); for the dlgm, -H[q(z1|x)] - log p(z1|z2)
    sampled (z2 from a second noise coordinate, plain normal draws here) and KL(q(z2|z1)||N(0,1)) closed form."""
    eps, lw = lattice(P)
    if name == "vae":
        loc, scale = guide.encoder(x)
        z = loc + scale * eps
        kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum(-1)
        per_particle = (recon(model.decoder(z), x) * w).sum(-1) + (kl * w).sum()
        return (per_particle * lw).sum()
    loc1, scale1 = guide.encoder(x)
    z1 = loc1 + scale1 * eps
    loc2, scale2 = guide.upper[0](z1)
    z2 = loc2 + scale2 * torch.randn(P, 1, 1)
    prior_loc, prior_scale = model.priors[0](z2)
    entropy = (scale1.log() + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)
    log_p1 = (-0.5 * ((z1 - prior_loc) / prior_scale) ** 2 - prior_scale.log()
              - 0.5 * math.log(2 * math.pi)).sum(-1)
    kl2 = (0.5 * (loc2**2 + scale2**2 - 1) - scale2.log()).sum(-1)
    per_particle = ((recon(model.decoder(z1), x) - entropy - log_p1 + kl2) * w).sum(-1)
    return (per_particle * lw).sum()


def plain_ms(name, fused):
    model, guide, P = pair(name)
    data = OneBit(N)
    x, w = data.x, data.w
    params = [*model.parameters(), *guide.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3, betas=(0.9, 0.99), fused=fused or None)
    for _ in range(WARMUP):
        optimizer.zero_grad(set_to_none=True)
        plain_loss(name, model, guide, x, w, P).backward()
        optimizer.step()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        plain_loss(name, model, guide, x, w, P).backward()
        optimizer.step()
    return 1e3 * (time.perf_counter() - t0) / STEPS


WARMUP = 75  # steps left out of the timing, in fit as in the plain loop: the traced plan's
# first calls profile and optimise (TorchScript), and a steady-state step is what a run is made of; fit logs (and
# checks its plan) every WARMUP steps, about as often as a run's every 100


def fit_ms(name, engine, threads=1):
    """fit's time per step after its one-time setup (choosing the engine, tracing the plan: in setup_seconds) and
    its first WARMUP steps: the time between the log at step WARMUP and the log at step WARMUP + STEPS."""
    model, guide, P = pair(name)
    stamps = {}
    result = fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=P, noise="lattice"),
                 steps=WARMUP + STEPS, seed=0, engine=engine, log_every=WARMUP, threads=threads,
                 callback=lambda step, row: stamps.setdefault(step, time.perf_counter()))
    SETUP[name].append(result.setup_seconds)
    ENGINE[(name, engine)] = result.engine
    first, last = WARMUP, max(stamps)
    return 1e3 * (stamps[last] - stamps[first]) / (last - first)


def replica_ratio(name, n, steps, rounds, threads=1, single_threads=None):
    """Medians over interleaved rounds of (three replicas together, with `threads` torch threads) / (three single
    fits, with single_threads, by default the same): (training seconds of `steps` steps, setup included; the steady
    step, the time between the log at step WARMUP and the last log; the recipe's steps, from each side's time to step
    WARMUP plus its steady step times the steps left). A run of the recipe's length is almost all steady steps, so
    the last is what replicas save on it."""
    from infer.fit_replicas import fit_replicas

    rows = []
    plan = recipe(VAE if name == "vae" else DLGM)
    for _ in range(rounds):
        pairs = [pair(name, n) for _ in range(3)]
        P = pairs[0][2]
        stamps = {}
        t0 = time.perf_counter()
        results = fit_replicas([p[0] for p in pairs], [p[1] for p in pairs], OneBit(n), [0, 1, 2], steps=steps,
                               elbo=ClosedFormELBO(num_particles=P, noise="lattice"), threads=threads,
                               log_every=WARMUP,
                               callback=lambda r, step, row: stamps.setdefault(step, time.perf_counter()))
        together = time.perf_counter() - t0
        STACK_ENGINE[name] = results[0].engine
        last = max(stamps)
        together_step = (stamps[last] - stamps[WARMUP]) / (last - WARMUP)
        together_recipe = stamps[WARMUP] - t0 + (plan.steps - WARMUP) * together_step
        alone = alone_step = alone_recipe = 0.0
        for seed, (model, guide, P) in enumerate(pairs):
            stamps = {}
            t0 = time.perf_counter()
            fit(model, guide, OneBit(n), elbo=ClosedFormELBO(num_particles=P, noise="lattice"), steps=steps,
                seed=seed, threads=threads if single_threads is None else single_threads, log_every=WARMUP,
                callback=lambda step, row: stamps.setdefault(step, time.perf_counter()))
            alone += time.perf_counter() - t0
            step = (stamps[last] - stamps[WARMUP]) / (last - WARMUP)
            alone_step += step
            alone_recipe += stamps[WARMUP] - t0 + (plan.steps - WARMUP) * step
        rows.append((together / alone, together_step / alone_step, together_recipe / alone_recipe))
    return tuple(statistics.median(row[k] for row in rows) for k in range(3))


def study_seconds():
    """(wall seconds, summary line) of the study sweep, run from a temporary directory."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(root / "run.py"), "-m", "+experiment=study",
                               "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], cwd=tmp, capture_output=True,
                              text=True)
        wall = time.perf_counter() - t0
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "sweep summary" in line]
        table = next(Path(tmp).rglob("summary.md"), None)
        by_config = ""
        if table is not None:
            text = table.read_text()
            by_config = text.split("## By configuration")[1].split("\n\n")[1] if "## By configuration" in text else ""
    return wall, proc.returncode, (lines[-1] if lines else proc.stderr[-500:]), by_config


def machine() -> str:
    """The machine these ratios were measured on (infer.runtime.machine: its kernels' rounding and speed differ
    between CPUs), and its one-thread float32 matmul speed at the decoder's size (256 x 64 @ 64 x 1000), the gauge of
    the machine's spell in docs/measurements.md."""
    from infer.runtime import machine as facts

    a, b = torch.randn(256, 64), torch.randn(64, 1000)
    for _ in range(200):
        a @ b
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(1000):
            a @ b
        rates.append(2 * 256 * 64 * 1000 * 1000 / (time.perf_counter() - start) / 1e9)
    m = facts()
    return (f"machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'flags unknown'}; torch kernels "
            f"{m['torch_kernels']}, torch {m['torch']}), {os.cpu_count()} cores; float32 matmul 256x64 @ 64x1000 on "
            f"one thread: {statistics.median(rates):.0f} GFLOP/s (median of 5)")


def main(rounds=5, study=True):
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the plain loop runs with fit's settings (infer.runtime.training_settings):
    held_heap()  # denormals flushed, and the heap held from the first round on (process-wide, as after any fit)
    print(machine())
    for name in ("vae", "dlgm"):
        times = {k: [] for k in ("plain", "plain_fused", "auto", "general")}
        for _ in range(rounds):  # interleaved, so a busy spell of the machine hits every variant alike
            times["plain"].append(plain_ms(name, fused=False))
            times["plain_fused"].append(plain_ms(name, fused=True))
            times["auto"].append(fit_ms(name, "auto"))
            times["general"].append(fit_ms(name, "general"))

        def ratio(a, b):
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        particles = 32 if name == "vae" else 128
        print(f"{name} (n={N}, {particles} lattice particles), median of {rounds} interleaved rounds of {STEPS} steps:")
        print(f"  ms/step (median): fit {statistics.median(times['auto']):.2f}, fit general path "
              f"{statistics.median(times['general']):.2f}, plain torch {statistics.median(times['plain']):.2f}, "
              f"plain torch with fused Adam {statistics.median(times['plain_fused']):.2f}")
        print(f"  fit / plain torch:                 {ratio('auto', 'plain'):.2f}x"
              f"   (general path {ratio('general', 'plain'):.2f}x)")
        print(f"  fit / plain torch with fused Adam: {ratio('auto', 'plain_fused'):.2f}x"
              f"   (general path {ratio('general', 'plain_fused'):.2f}x)")
        print(f"  fit's engine: {ENGINE[(name, 'auto')]}; one-time setup (engine check and trace) "
              f"{statistics.median(SETUP[name]):.1f} s")
        steps = recipe(VAE if name == "vae" else DLGM).steps
        fit_s, plain_s = (steps * statistics.median(times[k]) / 1e3 for k in ("auto", "plain_fused"))
        print(f"  the recipe's {steps} steps at these step times: fit {fit_s:.0f} s, plain torch with fused Adam "
              f"{plain_s:.0f} s")
    print(f"replicas: 3 seeds together / 3 single fits, median of {max(1, rounds // 2)} interleaved rounds: training "
          f"seconds (setup included); a steady step; and extrapolated to the recipe's steps (setup + steps):")
    for name in ("vae", "dlgm"):
        for n, steps in ((10, 1050), (100, 600), (1000, 450)):
            short, step, full = replica_ratio(name, n, steps, max(1, rounds // 2))
            print(f"  {name} n={n:<5} {steps} steps {short:.2f}x; steady step {step:.2f}x; recipe's steps {full:.2f}x")
    both = [(fit_ms("dlgm", "auto", threads=2), fit_ms("dlgm", "auto", threads=1)) for _ in range(rounds)]
    print(f"both cores (an idle machine only; threads=2 gives the numbers of 1): dlgm n={N}, fit step at 2 threads "
          f"/ at 1 thread {statistics.median(a / b for a, b in both):.2f}x (ms/step "
          f"{statistics.median(a for a, _ in both):.2f} / {statistics.median(b for _, b in both):.2f}, median of "
          f"{rounds})")
    for single_threads in (1, 2):
        ratios = replica_ratio("dlgm", 1000, 450, max(1, rounds // 2), threads=2, single_threads=single_threads)
        print(f"  3 dlgm replicas together at 2 threads ({STACK_ENGINE['dlgm']}) / 3 single fits at "
              f"{single_threads} thread{'s' if single_threads > 1 else ''}: "
              "{:.2f}x (steady step {:.2f}x, recipe's steps {:.2f}x)".format(*ratios))
    if study:
        wall, code, line, table = study_seconds()
        print(f"study: python run.py -m +experiment=study hydra/launcher=joblib hydra.launcher.n_jobs=2: "
              f"{wall:.0f} s wall ({wall / 60:.1f} min), exit {code}; {line.strip()}")
        print(table)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(int(args[0]) if args else 5, study="--no-study" not in sys.argv)
