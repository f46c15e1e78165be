"""The process settings training runs under: torch's thread count, denormal flushing, MKL's matmuls on the calling
thread, TorchScript's plain executor and a heap that keeps freed memory. Each was measured to make a step faster or
to keep the thread count out of the numbers; none changes what is computed (the executor's only effect on numbers
is its rounding, see training_settings). And the check that parallel jobs do not ask for more threads than there are
cores (oversubscription)."""
import contextlib
import ctypes
import ctypes.util
import functools
import os

import torch

_FLUSHING = [0]  # depth of nested flush_denormals blocks
# glibc's mallopt parameters (malloc.h) and the values held_heap sets: freed memory is trimmed back to the OS only
# above 1 GiB free at the heap's top, and only allocations above 32 MiB (the most glibc documents for 64-bit) get
# their own mmap
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_BYTES, MMAP_BYTES = 1 << 30, 32 << 20
_HEAP = []  # [whether the thresholds are set] once held_heap has run in this process
_MKL = []  # [MKL_Set_Num_Threads_Local or None] once looked up


@contextlib.contextmanager
def flush_denormals():
    """Denormal floats (below 1.2e-38 in float32, 2.2e-308 in float64) are flushed to zero while the block runs, and
    the mode is restored afterwards (nested blocks restore it at the outermost). Usable as a decorator.

    A network that has become steep makes them (sigmoid of a logit of -90 in the gradient of every far-off bit, an
    ELU of a pre-activation of -90), and each costs the CPU a slow microcode path: flushing halved a trained dlgm's
    training step at n = 1000 (82 s -> 42 s for 11000 steps, the same exact loss to 1e-16) and made its quadrature
    15-25% faster (bit-identical numbers). A value that small changes no update and no reported number."""
    flushed = _FLUSHING[0] == 0 and torch.set_flush_denormal(True)
    _FLUSHING[0] += 1
    try:
        yield
    finally:
        _FLUSHING[0] -= 1
        if flushed:
            torch.set_flush_denormal(False)


def held_heap() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide, once; a no-op where the C library has no
    mallopt). Returns whether the thresholds are set.

    By default glibc gives the free memory at the top of its heap back to the OS once it exceeds a threshold that
    follows the largest recent free (a few MiB), so a training step whose temporaries are several 1-3 MB tensors
    (the logits of the decoder at n = 1000: particles x 2 x n floats per replica) can hand them back at the end of
    each step and take fresh, zero-filled pages at the start of the next: measured 1100 minor page faults per
    step for three stacked dlgm replicas at n = 1000 (12.7 ms a step; 11.2 ms with the thresholds raised, no
    faults) and up to 300 per step for one (5.8 against 5.5 ms). The cost is a resident size that stays at its
    peak instead of shrinking between steps."""
    if not _HEAP:
        _HEAP.append(False)
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None) if libc is not None else None
        except OSError:
            mallopt = None
        if mallopt is not None:
            _HEAP[0] = bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES)) & bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES))
    return _HEAP[0]


def _mkl_local_threads():
    """MKL's thread-local thread count setter (MKL_Set_Num_Threads_Local) in the MKL that torch links, or None
    where torch has none (a build on OpenBLAS, or a platform without the symbol)."""
    if not _MKL:
        found = None
        if torch.backends.mkl.is_available():
            try:
                found = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
                found = getattr(found, "MKL_Set_Num_Threads_Local", None)
            except OSError:
                found = None
        _MKL.append(found)
    return _MKL[0]


@contextlib.contextmanager
def blas_threads(n: int):
    """MKL's matmuls run on n threads (1: on the calling thread) while the block runs, whatever torch's thread count;
    the previous setting is restored afterwards. A no-op where torch has no MKL."""
    set_local = _mkl_local_threads()
    if set_local is None:
        yield
        return
    previous = set_local(max(1, int(n)))
    try:
        yield
    finally:
        set_local(previous)


def serial_blas():
    """blas_threads(1): MKL's matmuls on the calling thread, whatever torch's thread count (torch's own ops still
    split their elements over torch's threads).

    With two threads MKL splits a matmul's inner dimension between them where it is long (the decoder's input
    gradient at n = 1000: a [256, 1000] @ [1000, 64] product), which sums in another order: a dlgm's loss then moved
    in the 7th digit after 300 steps. Elementwise ops and the reductions over the last dim come out the same for
    any split of their elements, so under this block threads=2 gives the numbers of threads=1 bit for bit
    (tests/test_runtime.py)."""
    return blas_threads(1)


def batched_blas_threads(compute, threads: int) -> int:
    """The MKL thread count a stack of replicas trains with: `threads` where compute() (a function returning a
    list of tensors, e.g. a stacked step's loss terms and gradients, the same draw each call) gives the same bits
    with MKL on `threads` threads as on one; else 1 (serial_blas).

    A stack's matmuls are batched over its replicas (torch.bmm), and MKL splits such a batch between its threads
    one product per thread, each summed as on one thread: three dlgm replicas at n = 1000 measured bit for bit
    the numbers of serial MKL at 2 threads, with a stacked step of 9.9 ms against 13.5 ms (serial MKL leaves the
    matmuls, half the step, on one core). The check is what makes that safe on another MKL or CPU: where a single
    bit differs, the stack stays serial, so a stack's numbers never depend on the thread count."""
    if threads is None or threads <= 1 or _mkl_local_threads() is None:
        return 1
    with blas_threads(1):
        serial = compute()
    with blas_threads(threads):
        threaded = compute()
    same = len(serial) == len(threaded) and all(torch.equal(a, b) for a, b in zip(serial, threaded))
    return threads if same else 1


@contextlib.contextmanager
def training_settings(threads):
    """While training: torch's thread count (None leaves it), MKL's matmuls serial (serial_blas: the thread count
    changes no number), denormals flushed (flush_denormals) and TorchScript's
    executor without its profiling optimisation (torch.jit.optimized_execution(False): the traced plan's ops run as
    traced; measured 3-10% faster per step on the dlgm; the profiling pass had rounded differently, so losses moved
    in the 7th-8th significant digit, the same in every process), each restored afterwards; and the heap held
    (held_heap, once per process)."""
    held_heap()
    old_threads = torch.get_num_threads()
    if threads is not None and threads != old_threads:
        torch.set_num_threads(threads)
    try:
        with flush_denormals(), serial_blas(), torch.jit.optimized_execution(False):
            yield
    finally:
        if threads is not None and threads != old_threads:
            torch.set_num_threads(old_threads)


def available_cores() -> int:
    """The number of CPUs this process may run on (its affinity mask; os.cpu_count where the OS keeps none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def oversubscription(threads, jobs: int = 1, cores: int = None):
    """A one-line warning when `jobs` processes that train in parallel, with `threads` torch threads each, ask for
    more threads than there are cores; None where they fit (or threads is None: torch's own setting).

    torch's threads wait for each other at the end of every parallel op, so one that the OS has descheduled stalls
    the others: two dlgm runs at n = 1000 with 2 threads each on this 2-core machine took 7.2x as long as with one
    thread each (70 s against 9.8 s for 2000 steps); one thread per process never waits."""
    cores = available_cores() if cores is None else cores
    if threads is None or threads <= 1 or threads * jobs <= cores:
        return None
    where = f"{jobs} parallel jobs x threads={threads}" if jobs > 1 else f"threads={threads}"
    return (f"{where} asks for {threads * jobs} threads on {cores} cores: torch's threads wait for each other at "
            f"every op, so training may run several times slower (measured 7x); use threads="
            f"{max(1, cores // max(jobs, 1))}")


@functools.lru_cache(maxsize=None)
def _machine() -> tuple:
    return tuple(sorted(_read_machine().items()))


def machine() -> dict:
    """What a run's numbers were computed on (see _read_machine), read once per process."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in _machine()}


def _read_machine() -> dict:
    """What a run's numbers were computed on: the CPU (its name and the instruction sets its kernels choose by:
    kernels of different vector widths round differently, and a long run carries that into the fourth decimal;
    README, "Reproducibility across CPUs"), torch's kernel level, and the versions of Python, torch and Pyro."""
    import platform

    import pyro

    name, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("unknown", "", platform.machine()):
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    return {"cpu": name, "cpu_flags": tuple(f for f in ("avx2", "avx512f", "amx_tile") if f in flags),
            "torch_kernels": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "torch": torch.__version__, "pyro": pyro.__version__}
