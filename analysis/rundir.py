"""A run's output directory: claimed before anything is written, and a status file that says how the run ended.

Every run and every sweep job leaves `status.json` in its directory:

    {"status": "running" | "ok" | "refused" | "diverged" | "failed", "reason": "<one line>", ...}

A directory that already holds a run's outputs (any of OUTPUTS) is never written into, unless the caller allows it
(`overwrite=true` on the command line, or resuming an interrupted run in place). A run that is refused before it
trains releases its directory: whatever the claim created is removed and whatever it overwrote is put back, so
it leaves no trace; a file or folder that was there before the claim is never removed by it.

A run directory is never the current directory while that holds anything but a run (an empty hydra.run.dir would
write a run's files among the user's), nor inside another run's directory (a folder above it holding a run's
status.json), except a replica of a replica group (<group dir>/seed<s>, listed in the group's status.json).
"""
import json
import os
import re
import shutil
import time
from pathlib import Path

STATUS = "status.json"
OUTPUTS = (STATUS, "metrics.json", "checkpoint.pt", "history.csv", "encodings.nc")
# everything a run writes into its directory besides run.log (Hydra's log, which a new run there appends to): what
# overwrite=true replaces, and nothing else (a file of another name there is never touched)
RUN_FILES = OUTPUTS + ("encodings.png", "training.png", "traceback.txt", ".hydra")
REPLICA_DIR = re.compile(r"seed[0-9]+")  # a replica group's member runs: <run dir>/seed<s> (listed in its status)
BACKUP = ".replaced"  # <run dir>/.replaced.<pid>/: a replaced run's files, kept until the new run starts for good
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


def is_run(path) -> bool:
    """Whether path is a run's directory: its status.json records a run (one of STATES)."""
    return read_status(path).get("status") in STATES


def previous_run(path) -> list:
    """The names (relative to path) of the files and folders of the run that path holds: its RUN_FILES and the
    replica dirs its status.json lists (seed<s>). [] when path holds no run (no run status.json and none of
    OUTPUTS): then nothing there is a run's to replace. (The backups an earlier replacement that was killed left,
    .replaced.*, are Claim.commit's to remove.)"""
    path = Path(path)
    if not path.is_dir() or not (is_run(path) or any((path / name).exists() for name in OUTPUTS)):
        return []
    names = [name for name in RUN_FILES if (path / name).exists() or (path / name).is_symlink()]
    replicas = read_status(path).get("replicas")
    for name in replicas if isinstance(replicas, list) else []:
        if isinstance(name, str) and REPLICA_DIR.fullmatch(name) and (path / name).is_dir():
            names.append(name)
    return names


def check_run_dir_setting(value, key: str = "hydra.run.dir") -> None:
    """Raise RunDirError (one line, naming key) unless value names a directory: an empty (or blank) path would put
    the run's files into the current directory. Call it on the config's raw value, before making it absolute."""
    if value is None or not str(value).strip():
        raise RunDirError(f"{key}={str(value)!r} is not allowed: {key} must name a directory (an empty path would "
                          "write the run's files into the current directory)")


def check_run_dir_place(path, key: str = "hydra.run.dir") -> None:
    """Raise RunDirError (one line, naming key) if the absolute run dir `path` lies inside another run's directory
    (a folder above it holds a run's status.json; a replica dir <group>/seed<s> that the group's status lists is
    its own run), or is the current directory while that holds files and no run."""
    path = Path(path).absolute()
    for above in path.parents:
        if not is_run(above):
            continue
        inner = path.relative_to(above)
        listed = read_status(above).get("replicas")
        if len(inner.parts) == 1 and isinstance(listed, list) and inner.name in listed:
            continue  # a replica's own dir
        raise RunDirError(f"{key}={path} is not allowed: it is inside the run directory {above} (it holds a run's "
                          f"{STATUS}); no run writes into another run's directory: choose a {key} outside it")
    try:
        here = Path.cwd()
    except OSError:
        return
    if path == here and not is_run(path) and any(path.iterdir()):
        raise RunDirError(f"{key}={path} is not allowed: it is the current directory, which holds other files; "
                          f"choose a new or empty directory for {key}")


class Claim:
    """A run directory claimed for one run: the directories the claim created, what was in the directory before,
    and (replace=True) the previous run's files moved aside, so that a refused run can be undone (release) without
    losing anything that was there before the claim.

    Two ways back, for two kinds of claim: an in-place claim (allow_existing: a resume, or overwrite=true into a
    dir without a run) overwrites only status.json and .hydra/*, so it keeps their bytes (kept) and writes them
    back; a replacing claim moves the previous run's files, large ones too, into .replaced.<pid>/ and moves them
    back (moved)."""

    def __init__(self, path, allow_existing: bool = False, replace: bool = False, key: str = "hydra.run.dir"):
        """Create `path` (and its parents) and mark it running. Raises RunDirError if path is a file, cannot be
        created, lies inside another run's directory or is a current directory holding other files
        (check_run_dir_place), or already holds a run (unless allow_existing).

        allow_existing: a run there may be written over (an in-place resume; overwrite=true). The status.json and
        .hydra/ files there are kept as they were, and put back by release().
        replace (with allow_existing; overwrite=true): the previous run's files (previous_run) are moved aside into
        <path>/.replaced.<pid>/ at once, so the new run's outputs never mix with the old ones; release() moves them
        back, and they are deleted (commit) once the run ends as ok, diverged or failed, i.e. after it passed every
        check before training. Files that are not a run's (someone's precious.png) are never moved or removed."""
        self.path = path = Path(path).absolute()
        self.created, self.before, self.kept, self.moved = [], set(), {}, []
        self.hydra_before = set()
        self.backup = path / f"{BACKUP}.{os.getpid()}"
        if path.exists() and not path.is_dir():
            raise RunDirError(f"output dir {path} is a file, not a directory (choose another {key})")
        check_run_dir_place(path, key)
        other = occupant(path)
        if other and not allow_existing:
            raise RunDirError(f"output dir {path} already holds {other}; choose another output dir, or set "
                              f"overwrite=true to replace it")
        probe = path
        while not probe.exists():
            self.created.insert(0, probe)
            probe = probe.parent
        try:  # what was there before the claim: never removed by it
            if path.is_dir():
                self.before = set(os.listdir(path))
                self.hydra_before = set(os.listdir(path / ".hydra")) if (path / ".hydra").is_dir() else set()
                self.kept = self._bookkeeping()
        except OSError as err:
            raise RunDirError(f"cannot read output dir {path}: {err.strerror or err}") from None
        try:
            path.mkdir(parents=True, exist_ok=True)
            if allow_existing and replace:
                self._move_aside(previous_run(path))
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

    def _bookkeeping(self) -> dict:
        """{relative name: bytes} of the small files a claim overwrites in place: status.json and .hydra/*."""
        kept = {}
        for target in [self.path / STATUS, *sorted((self.path / ".hydra").glob("*"))]:
            try:
                if target.is_file() and not target.is_symlink() and target.stat().st_size <= 2**20:
                    kept[str(target.relative_to(self.path))] = target.read_bytes()
            except OSError:
                pass
        return kept

    def _move_aside(self, names) -> None:
        if not names:
            return
        self.backup.mkdir(exist_ok=True)
        for name in names:
            os.replace(self.path / name, self.backup / name)
            self.moved.append(name)
        self.kept = {}  # the moved files come back whole
        self.before -= set(self.moved)

    def status(self, status: str, reason: str = "", **extra) -> None:
        """Record how the run stands (write_status). A final status other than refused (ok, diverged, failed: the
        run passed its checks and trained) commits the claim: the replaced run's files are deleted. A refused one
        (a sweep job refused before training) puts the replaced run's files back first, status.json aside."""
        if status in ("ok", "diverged", "failed"):
            self.commit()
        elif status == "refused" and self.moved:
            old = read_status(self.backup)
            self._move_back(keep_status=True)
            extra = {"kept": f"the outputs of the run that was here (status '{old.get('status', '?')}') are kept: "
                             "this run was refused before it trained", **extra}
        write_status(self.path, status, reason, **extra)

    def commit(self) -> None:
        """The run passed every check before training: delete the replaced run's files, and the backups that earlier
        killed replacements left (.replaced.*: this is the one place that handles them). Call it when training
        starts; status() calls it at the latest."""
        if self.moved or self.backup.exists():
            for old in self.path.glob(BACKUP + ".*"):  # this claim's backup among them
                shutil.rmtree(old, ignore_errors=True)
        self.moved = []

    def _move_back(self, keep_status: bool = False) -> None:
        for name in self.moved:
            if keep_status and name == STATUS:
                continue
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(self.backup / name, target)
            self.before.add(name)
        shutil.rmtree(self.backup, ignore_errors=True)
        self.moved = []

    def release(self) -> None:
        """Undo the claim of a refused run: if the claim created the run dir, remove it with everything in it (a log
        file Hydra opened, say), and the parents it created while they are empty. Otherwise remove only what
        appeared in it since the claim, put back the status.json and .hydra/ files it overwrote, and move a replaced
        run's files back. Never removes a file or folder that was there before the claim."""
        if self.path in self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.path.is_dir():
            if self.moved:
                self._move_back()
            for name in os.listdir(self.path):
                if name in self.before:
                    continue
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
            hydra = self.path / ".hydra"
            if ".hydra" in self.before and hydra.is_dir():  # files the run added to a .hydra/ that was there
                for extra in hydra.iterdir():
                    if extra.name not in self.hydra_before and not extra.is_dir():
                        extra.unlink(missing_ok=True)
            for name, content in self.kept.items():  # status.json, .hydra/*: as they were
                target = self.path / name
                try:
                    if not target.is_file() or target.read_bytes() != content:
                        target.parent.mkdir(exist_ok=True)
                        target.write_bytes(content)
                except OSError:
                    pass
        for folder in reversed(self.created):
            if not folder.exists():
                continue
            try:
                folder.rmdir()  # only if empty: another run may be using it
            except OSError:
                break
