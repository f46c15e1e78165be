"""The process settings training runs under (infer.runtime): each is on while fit trains and restored after, and
the held heap stops the page faults that freed megabyte tensors cost each step; more threads than cores are
warned of."""
import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infer import runtime
from infer.runtime import available_cores, held_heap, oversubscription, training_settings

ROOT = Path(__file__).resolve().parents[1]

# a training step's allocation pattern at n = 1000: 3 MB tensors (three replicas' logits) freed while small ones
# live on, then a new 3 MB one; prints the minor page faults per step
PATTERN = """
import ctypes, ctypes.util, resource, sys, torch
sys.path.insert(0, {root!r})
from infer.runtime import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, held_heap
if {hold}:
    assert held_heap()
else:  # glibc's initial thresholds, held fixed (by default they drift with the process's history)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) and libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
def step():
    a = torch.empty(3, 128, 2, 1000).fill_(1.0)
    b = torch.empty(3, 128, 2, 1000).fill_(1.0)
    small = [torch.ones(3, 128, 2, 64) for _ in range(8)]
    c = (a + b).sum()
    del a, b
    d = torch.empty(3, 256, 1000).fill_(2.0)
    return float(c) + float(d[0, 0, 0]) + len(small)
for _ in range(5):
    step()
windows = []  # the steady state: the fewest faults of three windows (a one-off event, e.g. the heap growing, fell
for _ in range(3):  # in one window of a single-window version during a full test run: 6.7 faults per step once)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        step()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
print(min(windows))
"""


def faults_per_step(hold: bool) -> float:
    code = PATTERN.format(root=str(ROOT), hold=hold)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_the_held_heap_takes_no_fresh_pages_for_a_steps_megabyte_tensors():
    if not held_heap():
        pytest.skip("this C library has no mallopt")
    assert faults_per_step(hold=False) > 1000  # the freed tensors went back to the OS: fresh pages every step
    assert faults_per_step(hold=True) < 5


def test_training_turns_torchscripts_profiling_optimisation_off_and_restores_it():
    assert torch._C._get_graph_executor_optimize()
    with training_settings(threads=None):
        assert not torch._C._get_graph_executor_optimize()
    assert torch._C._get_graph_executor_optimize()


def test_training_flushes_denormals_and_restores_gradual_underflow():
    tiny = torch.tensor([1e-30])
    with training_settings(threads=None):
        assert float(tiny * 1e-10) == 0.0  # 1e-40 is denormal in float32: flushed
    assert float(tiny * 1e-10) > 0.0


def test_training_sets_the_thread_count_and_restores_it():
    before = torch.get_num_threads()
    with training_settings(threads=1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_more_parallel_threads_than_cores_get_a_one_line_warning_naming_the_fix():
    message = oversubscription(2, jobs=2, cores=2)
    assert message is not None and "\n" not in message
    assert "2 parallel jobs x threads=2" in message and "4 threads on 2 cores" in message
    assert message.endswith("use threads=1")
    assert "threads=3 asks for 3 threads on 2 cores" in oversubscription(3, cores=2)


def test_threads_that_fit_the_cores_get_no_warning():
    assert oversubscription(1, jobs=10, cores=2) is None  # one thread per process never waits for another
    assert oversubscription(2, jobs=1, cores=2) is None
    assert oversubscription(None, jobs=4, cores=2) is None  # torch's own setting


def test_a_sweeps_parallel_jobs_are_the_joblib_launchers_n_jobs():
    from omegaconf import OmegaConf

    from run import parallel_jobs

    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert parallel_jobs(OmegaConf.create({"launcher": {"_target_": joblib, "n_jobs": 2}})) == 2
    assert parallel_jobs(OmegaConf.create({"launcher": {"_target_": joblib, "n_jobs": -1}})) == available_cores()
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert parallel_jobs(OmegaConf.create({"launcher": {"_target_": basic}})) == 1


def test_a_submitit_local_sweeps_jobs_all_run_at_once(monkeypatch):
    from omegaconf import OmegaConf

    from run import parallel_jobs

    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    monkeypatch.setenv("ONEBIT_SWEEP_JOBS", "4")  # the sweep's preflight counted its jobs
    assert parallel_jobs(OmegaConf.create({"launcher": {"_target_": local}})) == 4


def trained_parameters(threads):
    """The parameters of a dlgm at n = 1000 (where a 2-thread matmul would split its 1000-long inner dim) after
    100 steps with `threads` torch threads."""
    import pyro

    from guides import StructuredGuide
    from infer import fit
    from models import DLGM, OneBit

    pyro.set_rng_seed(0)
    model = DLGM(1000, prior_hidden=32, prior_layers=3, prior_gain=True, prior_gain_floor=0.0)
    guide = StructuredGuide(model)
    fit(model, guide, OneBit(1000), steps=100, seed=0, threads=threads)
    return [p.detach().clone() for p in (*model.parameters(), *guide.parameters())]


def test_two_threads_train_to_the_numbers_of_one_bit_for_bit():
    if runtime._mkl_local_threads() is None:
        pytest.skip("torch has no MKL here: its BLAS may split a matmul's sums over the threads")
    one, two = trained_parameters(1), trained_parameters(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@functools.lru_cache(maxsize=None)
def stacked_parameters(threads):
    """(results, params) of three dlgm replicas at n = 1000 trained together for 40 steps with `threads` threads
    (made once per thread count, for the tests below)."""
    from guides import StructuredGuide
    from infer import ClosedFormELBO
    from infer.fit_replicas import fit_replicas
    from models import DLGM, OneBit

    pairs = []
    for _ in range(3):
        model = DLGM(1000, prior_hidden=32, prior_layers=3, prior_gain=True, prior_gain_floor=0.0)
        pairs.append((model, StructuredGuide(model)))
    results = fit_replicas([m for m, _ in pairs], [g for _, g in pairs], OneBit(1000), [0, 1, 2], steps=40,
                           elbo=ClosedFormELBO(num_particles=32, noise="lattice"), threads=threads)
    return results, [p.detach().clone() for m, g in pairs for p in (*m.parameters(), *g.parameters())]


def test_two_threads_train_a_stack_of_replicas_to_the_numbers_of_one_bit_for_bit():
    (one_run, one), (two_run, two) = stacked_parameters(1), stacked_parameters(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert [r.history for r in one_run] == [r.history for r in two_run]


def test_a_stack_at_two_threads_puts_its_batched_matmuls_on_both_where_the_bits_agree():
    if runtime._mkl_local_threads() is None:
        pytest.skip("torch has no MKL here")
    (one_run, _), (two_run, _) = stacked_parameters(1), stacked_parameters(2)
    assert "matmuls on" not in one_run[0].engine
    assert two_run[0].engine.endswith("3 replicas stacked, matmuls on 2 threads")


def test_batched_blas_keeps_one_thread_where_the_bits_differ():
    if runtime._mkl_local_threads() is None:
        pytest.skip("torch has no MKL here")
    calls = iter(range(10))
    assert runtime.batched_blas_threads(lambda: [torch.tensor(float(next(calls)))], 2) == 1
    assert runtime.batched_blas_threads(lambda: [torch.tensor(1.0)], 2) == 2
    assert runtime.batched_blas_threads(lambda: [torch.tensor(1.0)], 1) == 1


def test_blas_threads_restores_mkls_thread_count():
    set_local = runtime._mkl_local_threads()
    if set_local is None:
        pytest.skip("torch has no MKL here")
    before = set_local(3)
    with runtime.blas_threads(2):
        assert set_local(2) == 2
    assert set_local(before) == 3


def test_serial_blas_restores_mkls_thread_count():
    set_local = runtime._mkl_local_threads()
    if set_local is None:
        pytest.skip("torch has no MKL here")
    with training_settings(threads=2):
        with runtime.serial_blas():
            assert set_local(1) == 1  # inside: MKL on the calling thread
    before = set_local(3)
    with runtime.serial_blas():
        pass
    assert set_local(before) == 3  # restored to what it was
