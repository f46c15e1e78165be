"""A run's output directory: claimed before anything is written, and a status file that says how the run ended.

Every run and every sweep job leaves `status.json` in its directory:

    {"status": "running" | "ok" | "refused" | "diverged" | "failed", "reason": "<one line>", ...}

A directory that already holds a run's outputs (any of OUTPUTS) is never written into, unless the caller allows it
(`overwrite=true` on the command line, or resuming an interrupted run in place). A run that is refused before it
trains releases its directory: whatever it created is removed, so it leaves no trace.
"""
import json
import os
import shutil
import time
from pathlib import Path

STATUS = "status.json"
OUTPUTS = (STATUS, "metrics.json", "checkpoint.pt", "history.csv", "encodings.nc")
STATES = ("running", "ok", "refused", "diverged", "failed")


class RunDirError(ValueError):
    """An output directory that cannot be used: occupied by another run, or not creatable."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> None:
    """Write text to path through a temporary file renamed into place, with the usual file mode (0666 & ~umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def read_status(path) -> dict:
    """The status.json of a run directory as a dict, or {} if it has none (or it cannot be read)."""
    try:
        return json.loads((Path(path) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def write_status(path, status: str, reason: str = "", **extra) -> None:
    """Record how the run in `path` stands: one of STATES and a one-line reason."""
    if status not in STATES:
        raise ValueError(f"status must be one of {', '.join(STATES)}, got {status!r}")
    old = read_status(path)
    # a replica group's members stay listed as it ends (a new run in the dir starts without them)
    kept = {k: old[k] for k in ("replicas",) if k in old and status != "running"}
    record = {"status": status, "reason": " ".join(str(reason).split()),
              "started": old.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")), "pid": os.getpid(), **kept, **extra}
    if status != "running":
        record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_atomic(Path(path) / STATUS, json.dumps(record, indent=2) + "\n")


def occupant(path) -> str:
    """What already lives in a run directory ('' if nothing of a run's outputs does)."""
    path = Path(path)
    if not path.is_dir():
        return ""
    status = read_status(path)
    if status:
        return f"a run with status '{status.get('status', '?')}'"
    found = [name for name in OUTPUTS if (path / name).exists()]
    return f"a run's outputs ({', '.join(found)})" if found else ""


class Claim:
    """A run directory claimed for one run: the directories the claim created and the files the run wrote, so that
    a refused run can be undone (release) without touching anything that was there before."""

    def __init__(self, path, allow_existing: bool = False):
        """Create `path` (and its parents) and mark it running. Raises RunDirError if path is a file, cannot be
        created, or already holds a run (unless allow_existing)."""
        self.path = path = Path(path).absolute()
        if path.exists() and not path.is_dir():
            raise RunDirError(f"output dir {path} is a file, not a directory (choose another hydra.run.dir)")
        other = occupant(path)
        if other and not allow_existing:
            raise RunDirError(f"output dir {path} already holds {other}; choose another output dir, or set "
                              f"overwrite=true to replace it")
        self.created, self.written, probe = [], [], path
        while not probe.exists():
            self.created.insert(0, probe)
            probe = probe.parent
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not allow_existing:  # exclusive: of two runs racing for one dir, exactly one gets it
                try:
                    os.close(os.open(path / STATUS, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                except FileExistsError:
                    raise RunDirError(f"output dir {path} was just claimed by another run; choose another "
                                      "output dir") from None
            self.status("running")
        except OSError as err:
            self.release()
            raise RunDirError(f"cannot write into output dir {path}: {err.strerror or err}") from None

    def status(self, status: str, reason: str = "", **extra) -> None:
        self.wrote(STATUS)
        write_status(self.path, status, reason, **extra)

    def wrote(self, *names) -> None:
        """Note files or folders (relative to the run dir) that this run wrote."""
        self.written += [n for n in names if n not in self.written]

    def release(self) -> None:
        """Undo the claim of a refused run: remove what it wrote; if the claim created the run dir, remove it with
        everything in it (a log file Hydra opened, say), and the parents it created while they are empty. Never
        touches another run's outputs."""
        if self.path in self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for name in self.written:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
        for folder in reversed(self.created):
            if not folder.exists():
                continue
            try:
                folder.rmdir()  # only if empty: another run may be using it
            except OSError:
                break
