"""A run directory claimed for one run (analysis.rundir's rules): created and marked running before anything is
written, and undone without a trace if the run is refused before it trains."""
import os
import shutil
from pathlib import Path

from .rundir import (BACKUP, STATUS, RunDirError, check_path_length, check_run_dir_place, occupant, previous_run,
                     read_status, replaced_backup, run_path, write_status)


class Claim:
    """A run directory claimed for one run: the directories the claim created, what was in the directory before,
    and (replace=True) the previous run's files moved aside, so that a refused run can be undone (release) without
    losing anything that was there before the claim.

    Two ways back, for two kinds of claim: an in-place claim (allow_existing: a resume, or overwrite=true into a
    dir without a run) overwrites only status.json and .hydra/*, so it keeps their bytes (kept) and writes them
    back; a replacing claim moves the previous run's files, large ones too, into .replaced.<pid>/ and moves them
    back (moved) until training starts, and deletes them once the new run ends ok (status)."""

    def __init__(self, path, allow_existing: bool = False, replace: bool = False, key: str = "hydra.run.dir",
                 launch: str = "", job: str = ""):
        """Create `path` (and its parents) and mark it running. Raises RunDirError if path is a file, cannot be
        created, lies inside another run's directory or is a current directory holding other files
        (check_run_dir_place), or already holds a run (unless allow_existing).

        allow_existing: a run there may be written over (an in-place resume; overwrite=true). The status.json and
        .hydra/ files there are kept as they were, and put back by release().
        replace (with allow_existing; overwrite=true): the previous run's files (previous_run) are moved aside into
        <path>/.replaced.<pid>/ at once, so the new run's outputs never mix with the old ones; release() moves them
        back before training starts (commit), and they are deleted once the run ends ok; a run that diverges or
        fails leaves them there, named in its status.json. Files that are not a run's (someone's precious.png) are
        never moved or removed."""
        self.launch = launch  # the sweep launch this job belongs to (analysis.jobs.launch_of), in its status.json
        self.job = job  # the launcher's id of the job (submitit's: its logs' folder), in its status.json
        self.path = path = run_path(path)
        self.created, self.before, self.kept, self.moved = [], set(), {}, []
        self.started = False  # training began (commit): from then on what the run writes is never removed
        self.hydra_before = set()
        self.backup = path / f"{BACKUP}.{os.getpid()}"
        check_path_length(path, key)
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
            if _logging_to(self.path / name):  # a sweep job's run.log, which Hydra opened (append) before the claim:
                shutil.copyfile(self.path / name, self.backup / name)  # the old run's lines aside, the file emptied,
                os.truncate(self.path / name, 0)  # and this run's lines go on into it
            else:
                os.replace(self.path / name, self.backup / name)
            self.moved.append(name)
        self.kept = {}  # the moved files come back whole
        self.before -= set(self.moved)

    def status(self, status: str, reason: str = "", **extra) -> None:
        """Record how the run stands (write_status). Only a run that ends ok deletes the replaced run's files (and the
        backups that earlier replacements left, .replaced.*). One that diverged or failed (killed, crashed) after it
        began training leaves them aside in .replaced.<pid>/, named in its status.json ('replaced_run'), so that a
        replacement gone wrong never costs the run it replaced. A refused one (a sweep job refused before training)
        puts the replaced run's files back first, status.json aside."""
        if status == "ok":
            self.commit()
            self.discard_replaced()
        elif status in ("diverged", "failed"):
            self.commit()
            kept = self.kept_aside()
            if kept:
                extra = {"replaced_run": f"the run this one replaced is kept in {kept}: move its files back into "
                                         f"{self.path} to restore it", **extra}
        elif status == "refused" and self.moved:
            old = read_status(self.backup)
            self._move_back(keep_status=True)
            extra = {"kept": f"the outputs of the run that was here (status '{old.get('status', '?')}') are kept: "
                             "this run was refused before it trained", **extra}
        tags = {**({"launch": self.launch} if self.launch else {}), **({"launcher_job": self.job} if self.job else {})}
        write_status(self.path, status, reason, **tags, **extra)

    def commit(self) -> None:
        """The run passed every check before training and trains: it can no longer be undone (release no longer
        moves the replaced run back). The replaced run's files stay aside in .replaced.<pid>/ until the run ends ok
        (status). Call it when training starts; status() calls it at the latest."""
        self.moved = []
        self.started = True

    def kept_aside(self):
        """The newest backup of a replaced run in this dir (rundir.replaced_backup: a Path), or None."""
        return replaced_backup(self.path)

    def kept_note(self) -> str:
        """' (the run it replaced is kept in <backup>)' where a replaced run's files are kept aside here; '' else."""
        kept = self.kept_aside()
        return f" (the run it replaced is kept in {kept})" if kept else ""

    def discard_replaced(self) -> None:
        """Delete the replaced run's files and the backups earlier replacements left (.replaced.*: this is the one
        place that removes them): the run that replaces them ended ok."""
        for old in self.path.glob(BACKUP + ".*"):
            shutil.rmtree(old, ignore_errors=True)

    def _move_back(self, keep_status: bool = False) -> None:
        for name in self.moved:
            if keep_status and name == STATUS:
                continue
            target = self.path / name
            if _logging_to(target):  # the open run.log: the old run's lines back in place (O_APPEND writes follow)
                with open(target, "r+b") as log, open(self.backup / name, "rb") as old:
                    log.truncate(0)
                    shutil.copyfileobj(old, log)
                continue
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
        run's files back. Never removes a file or folder that was there before the claim, nor anything once training
        began (commit)."""
        if self.started:
            return
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


def _logging_to(path: Path) -> bool:
    """Whether a logging.FileHandler of this process holds path open (Hydra's run.log of a sweep job, once a line was
    logged: its handler opens the file at the first line)."""
    import logging

    target = os.path.abspath(path)
    return any(isinstance(h, logging.FileHandler) and getattr(h, "stream", None) is not None
               and os.path.abspath(h.baseFilename) == target for h in logging.getLogger().handlers)
