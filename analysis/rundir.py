"""A run's output directory: claimed before anything is written, and a status file that says how the run ended.

Every run and every sweep job leaves `status.json` in its directory:

    {"status": "running" | "ok" | "refused" | "diverged" | "failed", "reason": "<one line>", ...}

A directory that already holds a run's outputs (any of OUTPUTS) is never written into, unless the caller allows it
(`overwrite=true` on the command line, or resuming an interrupted run in place). A run that is refused before it
trains releases its directory: whatever the claim created is removed and whatever it overwrote is put back, so
it leaves no trace; a file or folder that was there before the claim is never removed by it.

A run directory is never the current directory while that holds anything but a run (an empty hydra.run.dir would
write a run's files among the user's), nor inside another run's directory (a folder above it holding a run's
status.json), except a replica of a replica group (<group dir>/seed<s>, listed in the group's status.json), nor a
folder that holds other runs below it (hydra.run.dir=outputs). Each rule is applied to the directory as the OS
reads its path (run_path: '..' taken out, so that a/new/../b is judged as a/b, and no folder 'new' is made).
"""
import json
import os
import re
import socket
import time
from pathlib import Path

from infer.files import write_atomic  # noqa: F401  (re-exported: analysis writes its files through it)

STATUS = "status.json"
OUTPUTS = (STATUS, "metrics.json", "checkpoint.pt", "history.csv", "encodings.nc")
LOG = "run.log"  # Hydra's log of the run: a run resumed in place appends to it
# everything a run writes into its directory: what overwrite=true replaces, and nothing else (a file of another name
# there is never touched)
RUN_FILES = OUTPUTS + ("encodings.png", "training.png", "traceback.txt", ".hydra", LOG)
REPLICA_DIR = re.compile(r"seed[0-9]+")  # a replica group's member runs: <run dir>/seed<s> (listed in its status)
BACKUP = ".replaced"  # <run dir>/.replaced.<pid>/: a replaced run's files, kept until the new run starts for good
STATES = ("running", "ok", "refused", "diverged", "failed")


class RunDirError(ValueError):
    """An output directory that cannot be used: occupied by another run, or not creatable."""


def run_path(path) -> Path:
    """The absolute path of a run's (or a sweep's, or a checkpoint's) directory or file, as the OS reads it: every
    check and claim of one run dir then sees the one place its run writes. Relative to the current directory, with
    '.' and '..' taken out, so that /a/new/../b is /a/b (no folder 'new' is made to get there) and /a/run/.. is /a;
    symlinks are kept as given (not Path.resolve, which resolves every one), except one that a '..' steps out of,
    whose target the OS goes up from (not os.path.abspath, which goes up from the link's own folder)."""
    parts = Path(path).absolute().parts  # absolute() keeps '..'
    out = Path(parts[0])
    for part in parts[1:]:
        if part != "..":
            out = out / part
            continue
        try:
            if out.is_symlink():
                out = Path(os.path.realpath(out))
        except OSError:  # a name too long to look up: no link (check_path_length refuses it in one line)
            pass
        out = out.parent
    return out


def json_kind(value) -> str:
    """What a JSON value is, in JSON's words: 'an object', 'an array', 'a string', 'a number', 'true', 'false' or
    'null'."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def load_status(path) -> tuple:
    """(record, problem): the status.json of a run directory as a dict ({} where it has none or it cannot be read;
    without its 'status' where that is none of STATES), and why it cannot be read where it is there ('' otherwise)."""
    try:
        record = json.loads((Path(path) / STATUS).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}, ""
    except OSError as err:
        return {}, err.strerror or str(err)
    except ValueError as err:  # a half-written or garbled file
        return {}, f"not JSON: {err}"
    if not isinstance(record, dict):
        return {}, f"not a JSON object: {json_kind(record)}"
    if record.get("status") is not None and (not isinstance(record["status"], str) or record["status"] not in STATES):
        said = json.dumps(record.pop("status"))  # no run's status: the record says nothing of how the run stands
        return record, f"its status {said[:40]} is none of {', '.join(STATES)}"
    return record, ""


def read_status(path) -> dict:
    """The status.json of a run directory as a dict, or {} if it has none (or it cannot be read, or holds no JSON
    object: status_problem says why)."""
    return load_status(path)[0]


def status_problem(path) -> str:
    """Why the status.json of a run directory cannot be read ('not JSON: ...', 'not a JSON object: an array', a status
    that is none of STATES, an OS error); '' where it reads as a run's record or there is none."""
    return load_status(path)[1]


def write_status(path, status: str, reason: str = "", **extra) -> None:
    """Record how the run in `path` stands: one of STATES and a one-line reason."""
    if status not in STATES:
        raise ValueError(f"status must be one of {', '.join(STATES)}, got {status!r}")
    old = read_status(path)
    # a replica group's members stay listed as it ends (a new run in the dir starts without them)
    kept = {k: old[k] for k in ("replicas", "launch") if k in old and status != "running"}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    begins = status == "running" and old.get("pid") != os.getpid()  # a run of this process starts: its own time
    record = {"status": status, "reason": " ".join(str(reason).split()),
              "started": now if begins else old.get("started", now), "pid": os.getpid(),
              "host": socket.gethostname(), **kept, **extra}
    if status != "running":
        record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_atomic(Path(path) / STATUS, json.dumps(record, indent=2) + "\n")


def replaced_backup(path):
    """The newest backup of a replaced run in the run dir path (<path>/.replaced.<pid>/, a Path), or None."""
    found = []
    for backup in Path(path).glob(BACKUP + ".*"):
        try:
            found.append((backup.stat().st_mtime, str(backup), backup))
        except OSError:  # removed meanwhile
            continue
    return max(found)[2] if found else None


def occupant(path) -> str:
    """What already lives in a run directory ('' if nothing of a run's outputs does)."""
    path = Path(path)
    if not path.is_dir():
        return ""
    status = read_status(path)
    backup = replaced_backup(path)  # a replacement that did not end ok left it
    kept = (f" (the run it was replacing is kept in {backup}: move its files back into {path} to restore it; "
            "a run there with overwrite=true that ends ok deletes it)" if backup else "")
    if status:
        return f"a run with status '{status.get('status', '?')}'{kept}"
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


def is_listed_replica(path) -> bool:
    """Whether path is a replica's own run dir: <group dir>/seed<s>, listed in its group's status.json."""
    path = Path(path)
    listed = read_status(path.parent).get("replicas")
    return bool(REPLICA_DIR.fullmatch(path.name)) and isinstance(listed, list) and path.name in listed


def check_run_dir_setting(value, key: str = "hydra.run.dir") -> None:
    """Raise RunDirError (one line, naming key) unless value names a directory: an empty (or blank) path would put
    the run's files into the current directory. Call it on the config's raw value, before making it absolute."""
    if value is None or not str(value).strip():
        raise RunDirError(f"{key}={str(value)!r} is not allowed: {key} must name a directory (an empty path would "
                          "write the run's files into the current directory)")


def check_path_length(path, key: str = "hydra.run.dir") -> None:
    """Raise RunDirError (one line, naming key) if the absolute run dir `path` has a folder name longer than its
    filesystem allows (NAME_MAX: 255 bytes on most), or is longer than a path may be (PATH_MAX): the OS would refuse
    it with ENAMETOOLONG at the first look."""
    path = run_path(path)
    probe = path.parent
    while True:
        try:
            if probe.exists() or probe == probe.parent:
                break
        except OSError:  # the name itself is too long to look up
            pass
        probe = probe.parent
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in path.parts:
        if len(part.encode()) > name_max:
            raise RunDirError(f"{key}=.../{part[:40]}... is not allowed: that folder name is {len(part.encode())} "
                              f"bytes, and this filesystem allows at most {name_max}: choose a shorter {key}")
    if len(str(path).encode()) >= path_max:
        raise RunDirError(f"{key}={str(path)[:60]}... is not allowed: the path is {len(str(path).encode())} bytes, "
                          f"and this system allows fewer than {path_max}: choose a shorter {key}")


def check_run_dir_place(path, key: str = "hydra.run.dir") -> None:
    """Raise RunDirError (one line, naming key) if the absolute run dir `path` lies inside another run's directory
    (a folder above it holds a run's status.json; a replica dir <group>/seed<s> that the group's status lists is
    its own run), holds another run below it (run_below: e.g. outputs/, the folder of every run), or is the
    current directory while that holds files and no run."""
    path = run_path(path)
    for above in path.parents:
        if not is_run(above):
            continue
        if path.parent == above and is_listed_replica(path):
            continue  # a replica's own dir
        raise RunDirError(f"{key}={path} is not allowed: it is inside the run directory {above} (it holds a run's "
                          f"{STATUS}); no run writes into another run's directory: choose a {key} outside it")
    below = run_below(path)
    if below is not None:
        raise RunDirError(f"{key}={path} is not allowed: it holds the run directory {below} (a folder of runs, not a "
                          f"run's); a run's files would mix with theirs: choose a new {key}")
    try:
        here = Path.cwd()
    except OSError:
        return
    if path == here and not is_run(path) and any(path.iterdir()):
        raise RunDirError(f"{key}={path} is not allowed: it is the current directory, which holds other files; "
                          f"choose a new or empty directory for {key}")


def run_below(path, depth: int = 4, folders: int = 10000):
    """The first run directory found strictly below path (breadth first, down to `depth` levels, looking into at most
    `folders` folders), other than the replica dirs that path's own status.json lists and hidden folders (.hydra/,
    the backups of a replaced run, .replaced.<pid>/); None if there is none."""
    path = Path(path)
    own = read_status(path).get("replicas") if is_run(path) else None
    own = set(own) if isinstance(own, list) else set()
    level, seen = [path], 0
    for _ in range(depth):
        deeper = []
        for folder in level:
            seen += 1
            if seen > folders:
                return None
            try:
                entries = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or folder == path and entry.name in own:
                    continue  # .hydra/, a replaced run's backup (.replaced.<pid>/), or this run's own replicas
                if is_run(entry.path):
                    return Path(entry.path)
                deeper.append(Path(entry.path))
        level = deeper
    return None


def live_owner(out):
    """The pid of the process running the run in `out`, when its status.json says running and names a live Python
    process other than this one, begun before the run's 'started'; None otherwise (no run, a run that ended, one
    killed by SIGKILL whose status still says running, or a pid the OS has since given to another process)."""
    status = read_status(out)
    pid = status.get("pid")
    if status.get("status") != "running" or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return None
    if not pid_alive(pid):
        return None
    try:  # a pid the OS has given to another program since is not the run
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"python" not in handle.read():
                return None
    except OSError:
        return pid
    begun = _process_start(pid)  # nor is a Python process started after the run was (the pid reused)
    try:
        started = time.mktime(time.strptime(str(status.get("started")), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return pid
    return None if begun is not None and begun > started + 2 else pid


def pid_alive(pid: int) -> bool:
    """Whether process pid runs on this machine (another user's too; not a zombie, which has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _process_start(pid: int):
    """When process pid began (seconds since the epoch, from Linux's /proc); None where that cannot be read."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
