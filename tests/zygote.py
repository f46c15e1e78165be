"""`python run.py ...` for the tests, in a process forked from one that has already imported the third-party
libraries (torch, Pyro, Hydra, ArviZ: about 5 of the 8 s a small run takes), so that each command-line test pays
for its own work only.

The forked child is the command line as a user runs it, but for those imports: a new process, in the test's cwd and
environment, with sys.argv and sys.path[0] as `python run.py` sets them, run.py executed as __main__, every module
of this project imported afresh, stdout and stderr captured apart, and its exit code that of the interpreter
(SystemExit's code; 1 and a traceback for an uncaught exception; -N for a signal). The parent of the fork never
runs a torch op, so no thread pool is forked. ONEBIT_TESTS_FRESH_PROCESSES=1 runs every test's command line in a
fresh interpreter instead (subprocess.run), as before.
"""
import json
import os
import select
import signal
import subprocess
import sys
import tempfile

PRELOAD = ("torch", "torch._dynamo", "pyro", "pyro.infer", "hydra", "omegaconf", "arviz", "scipy.stats", "matplotlib")
# torch._dynamo: what torch.optim imports at its first optimizer (2 s), in every run that trains

# the zygote: import PRELOAD, then for each request on stdin (one JSON line) fork a child that runs run.py, answer
# with its pid, wait for it and answer with its exit code; EOF on stdin (the test process ended) ends it
_SERVER = r"""
import gc, importlib, json, os, runpy, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
gc.freeze()  # the preloaded objects: never traversed by a child's collections, so their pages stay shared
out = os.fdopen(int(sys.argv[2]), "w", buffering=1)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out.close()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = req["argv"]
        sys.path[0] = os.path.dirname(req["argv"][0])
        sys.stdin = open(os.devnull)
        runpy.run_path(req["argv"][0], run_name="__main__")
        sys.exit(0)
    out.write(f"{pid}\n")
    _, status = os.waitpid(pid, 0)
    out.write(f"{os.waitstatus_to_exitcode(status)}\n")
"""


class Zygote:
    """One forking server per test process, started on first use."""

    def __init__(self):
        self.proc = None

    def _start(self):
        read, write = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, ",".join(PRELOAD), str(write)],
                                     stdin=subprocess.PIPE, pass_fds=(write,), env=env, text=True)
        os.close(write)
        self.answers = os.fdopen(read, "r")

    def _answer(self, timeout=None):
        ready, _, _ = select.select([self.answers], [], [], timeout)
        if not ready:
            return None
        line = self.answers.readline()
        if not line:
            raise RuntimeError("the command-line zygote ended (tests/zygote.py)")
        return int(line)

    def run(self, argv, cwd, env, timeout):
        """subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout), forked."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        with tempfile.TemporaryDirectory() as tmp:
            paths = {k: os.path.join(tmp, k) for k in ("stdout", "stderr")}
            for path in paths.values():
                open(path, "w").close()
            self.proc.stdin.write(json.dumps({"argv": argv[1:], "cwd": str(cwd), "env": env, **paths}) + "\n")
            self.proc.stdin.flush()
            pid = self._answer()
            code = self._answer(timeout)
            if code is None:
                os.kill(pid, signal.SIGKILL)
                self._answer()
            out, err = (open(paths[k], errors="replace").read() for k in ("stdout", "stderr"))
        if code is None:
            raise subprocess.TimeoutExpired(argv, timeout, out, err)
        return subprocess.CompletedProcess(argv, code, out, err)


ZYGOTE = Zygote()


def run(argv, cwd, env, timeout, fresh: bool = None):
    """What run_cli runs: forked from the zygote, or a fresh interpreter where `fresh` says so (by default, where
    ONEBIT_TESTS_FRESH_PROCESSES=1)."""
    if fresh is None:
        fresh = os.environ.get("ONEBIT_TESTS_FRESH_PROCESSES") == "1"
    if fresh:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return ZYGOTE.run(argv, cwd, env, timeout)
