"""Summaries of a Hydra sweep directory: summary.csv, summary.md and the sweep figures.

    python -m analysis.sweep multirun/2026-01-01/12-00-00      (--help: its usage; one directory, '--' before one
                                                               whose name starts with '-')

The sweep's jobs are those of its multirun.yaml: a job directory counts when its overrides are one of the sweep's
combinations and its job number is that combination's (job_dirs); directories of an earlier launch into the same
folder, of another sweep or of a single run are left out, and the summary says how many. A job with replicas is
one run per seed (its replica directories). A run without metrics.json is a failed run; a combination without a
job directory of this launch is listed as missing. Without a multirun.yaml every job directory below counts.

Outputs, in the sweep directory, each written to a temporary file beside it and renamed into place (an old summary
is replaced whole or not at all; a file that cannot be written is one line naming it and the OS error, exit 2):
* summary.csv: one row per run: status, duplicate_of, its overrides, the config summary and every metric (nested
  blocks flattened with dots: kl.z, exact.loss, khat.x0, ...);
* summary_by_config.csv: seeds aggregated (mean, sd, count of the runs that have the metric) per (model, guide, n,
  other varying overrides), each (configuration, seed) once;
* summary.md: the aggregated table (mean ± sd over seeds), the per-run table, and the failed/missing jobs;
* loss_vs_n.png, recon_per_dim_vs_n.png, encodings_grid.png, and rate_distortion.png where the runs span more than
  one beta or more than one model/guide family.

The work is split by job: analysis.jobs (which directories are the sweep's runs, and their rows), analysis.aggregate
(the tables), analysis.summary_md (summary.md) and analysis.sweep_figures (the figures); this module writes the
files and is the command line. Their public names are importable from here as well.
"""
import logging
import os
import re
import sys
from pathlib import Path

from .aggregate import ID_COLUMNS, fixed_overrides, settled, tables
from .jobs import collect, expected_jobs, flatten, job_dirs, read_job, select
from .summary_md import markdown
from .sweep_figures import LN2, ORIGINAL, encodings_figure, rate_distortion_figure, sweep_figures

log = logging.getLogger("onebit.sweep")
__all__ = ["ID_COLUMNS", "LN2", "ORIGINAL", "collect", "encodings_figure", "expected_jobs", "fixed_overrides",
           "flatten", "job_dirs", "main", "markdown", "rate_distortion_figure", "read_job", "select", "summarize",
           "sweep_figures", "tables", "write_files"]


class NotASweep(ValueError):
    """A directory that holds no sweep to summarise (a single run's, or one without job directories)."""


class SummaryWriteError(OSError):
    """A summary file that cannot be written; its message names the file and the OS error."""


def _discard(paths) -> None:
    """Remove the files in paths that exist (temporary files of a write given up); returns None."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


LEFTOVER = re.compile(r"\.figures\.(?P<pid>\d+)\..+|\..+\.(?P<tmp>\d+)\.tmp")  # _figures' scratch, write_files'


def clear_leftovers(sweep_dir: Path, quiet_for: float = 600.0) -> list:
    """Remove what a summary killed mid-write (SIGKILL) left in sweep_dir: its figures' scratch folder
    (.figures.<pid>.*) and its temporary files (.<name>.<pid>.tmp), where that pid runs no longer on this machine and
    the leftover has not changed for quiet_for seconds (a summary on another host of a shared filesystem writes its
    own for seconds). Returns the paths removed."""
    import shutil
    import time

    from .rundir import pid_alive

    removed = []
    try:
        entries = list(os.scandir(sweep_dir))
    except OSError:
        return removed
    for entry in entries:
        found = LEFTOVER.fullmatch(entry.name)
        try:
            if not found or pid_alive(int(found["pid"] or found["tmp"])) or \
                    time.time() - entry.stat(follow_symlinks=False).st_mtime < quiet_for:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def write_files(writers: dict) -> list:
    """Write every file of writers ({path: write}, write(tmp) writing the file's content to tmp) through a temporary
    file beside it (.<name>.<pid>.tmp), each renamed into place once all are written: where one cannot be written
    (a read-only folder, a full disk) none is replaced, the old files stay whole and no temporary file is left.
    Returns the paths written; raises SummaryWriteError naming the file and the OS error."""
    staged = {}
    for path, write in writers.items():
        staged[path] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            write(staged[path])
        except OSError as err:
            _discard(staged.values())
            raise SummaryWriteError(f"cannot write {path}: {err.strerror or err} (no summary file was replaced)") \
                from None
    for path, tmp in staged.items():
        try:
            os.replace(tmp, path)
        except OSError as err:
            _discard(staged.values())
            raise SummaryWriteError(f"cannot write {path}: {err.strerror or err}") from None
    return list(staged)


def _figures(agg, jobs, sweep_dir: Path) -> list:
    """Draw the sweep figures into a temporary folder in sweep_dir, then rename each into place, so that an old
    figure is replaced whole or not at all. Returns the paths written; a figure that fails is logged and skipped
    (a broken figure must not hide the tables)."""
    import shutil
    import tempfile

    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".figures.{os.getpid()}.", dir=sweep_dir))
    except OSError as err:
        log.warning("sweep figures not drawn: cannot write into %s: %s", sweep_dir, err.strerror or err)
        return []
    written = []
    try:
        for step in (lambda: sweep_figures(agg, jobs, scratch), lambda: [encodings_figure(jobs, scratch)],
                     lambda: [rate_distortion_figure(jobs, scratch)]):
            try:
                for drawn in [p for p in step() if p is not None]:
                    os.replace(drawn, sweep_dir / drawn.name)
                    written.append(sweep_dir / drawn.name)
            except Exception as err:  # noqa: BLE001
                log.warning("sweep figure failed: %s: %s", type(err).__name__, err)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return written


def check_sweep_dir(sweep_dir: Path) -> None:
    """Raise FileNotFoundError where sweep_dir does not exist, NotASweep where it is a file or anything else that is
    not a directory; each message names the path and says what to give instead."""
    if sweep_dir.is_dir():
        return
    if not os.path.lexists(sweep_dir):
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist: give the folder a `python run.py -m` "
                                "sweep wrote (hydra.sweep.dir)")
    what = "a file" if sweep_dir.is_file() else "a broken link" if sweep_dir.is_symlink() and not sweep_dir.exists() \
        else "a special file (a device, socket or pipe)"
    raise NotASweep(f"{sweep_dir} is {what}, not a directory: give the folder a `python run.py -m` sweep wrote "
                    "(hydra.sweep.dir)")


def summarize(sweep_dir, figures: bool = True, ended: bool = False) -> dict:
    """Read this sweep's runs (job_dirs: only the jobs of its multirun.yaml) and write summary.csv,
    summary_by_config.csv, summary.md and the sweep figures.

    Returns dict(jobs=DataFrame (one row per run), aggregated=DataFrame, failed=[run dirs], missing=[override
    strings], launched=[this sweep's job dirs], left_out=[job dirs of other launches], duplicates=[run dirs
    dropped from the means], files=[paths written]). Each file is written whole or not at all (write_files): where
    the tables cannot be written, SummaryWriteError names the file and the OS error, and the old ones stay."""
    sweep_dir = Path(sweep_dir)
    check_sweep_dir(sweep_dir)
    from .rundir import is_run, read_status

    if is_run(sweep_dir) and not (sweep_dir / "multirun.yaml").exists() and not read_status(sweep_dir).get("replicas"):
        raise NotASweep(f"{sweep_dir} is a single run's directory (it holds a run's status.json), not a sweep's or a "
                        "replica group's: give the folder that holds the sweep's multirun.yaml and job directories")
    clear_leftovers(sweep_dir)
    found = collect(sweep_dir, ended)  # ended: every job has returned (the sweep's end callback)
    if not found["rows"] and not found["missing"] and not (sweep_dir / "multirun.yaml").exists():
        raise NotASweep(f"{sweep_dir} holds no sweep (no multirun.yaml and no job directory): give the folder a "
                        "`python run.py -m` sweep wrote (hydra.sweep.dir)")
    rows = settled(found["rows"])  # once: tables and fixed_overrides find nothing left to fill in
    jobs, agg = tables(rows)
    missing = found["missing"]
    text = markdown(jobs, agg, missing, sweep_dir, launched=found["launched"], left_out=found["left_out"],
                    fixed=fixed_overrides(rows))
    files = write_files({sweep_dir / "summary.csv": lambda tmp: jobs.to_csv(tmp, index=False),
                         sweep_dir / "summary_by_config.csv": lambda tmp: agg.to_csv(tmp, index=False),
                         sweep_dir / "summary.md": lambda tmp: tmp.write_text(text)})
    if figures:
        files += _figures(agg, jobs, sweep_dir)
    failed = list(jobs.loc[jobs["status"] != "ok", "job"])
    duplicates = list(jobs.loc[jobs["duplicate_of"].notna(), "job"])
    return {"jobs": jobs, "aggregated": agg, "failed": failed, "missing": missing, "files": files,
            "launched": [str(p.relative_to(sweep_dir)) for p in found["launched"]],
            "left_out": [str(p.relative_to(sweep_dir)) for p in found["left_out"]], "duplicates": duplicates}


USAGE = "usage: python -m analysis.sweep [-h] SWEEP_DIR"
HELP = f"""{USAGE}

Write summary.csv, summary_by_config.csv, summary.md and the sweep figures of a `python run.py -m` sweep into its
directory (SWEEP_DIR: the sweep's hydra.sweep.dir, which holds its multirun.yaml and job directories), and print
summary.md. A SWEEP_DIR whose name starts with '-' goes after '--'.

options:
  -h, --help  show this help and exit
"""


def sweep_dir_argument(argv: list) -> Path:
    """The one sweep directory of the command line argv; prints HELP and exits 0 for -h/--help; ArgumentError (one
    line) for an unknown option, no directory or more than one. After '--' every argument is a directory."""
    cut = argv.index("--") if "--" in argv else len(argv)
    options, after = argv[:cut], argv[cut + 1:]
    if any(a in ("-h", "--help") for a in options):
        print(HELP, end="")
        sys.exit(0)
    unknown = [a for a in options if a.startswith("-") and a != "-"]
    if unknown:
        raise ArgumentError(f"{unknown[0]} is not an option of analysis.sweep: it takes one sweep directory (and "
                            f"-h/--help; a directory whose name starts with '-' goes after '--'); {USAGE}")
    dirs = options + after
    if len(dirs) != 1:
        given = "none" if not dirs else f"{len(dirs)} ({' '.join(dirs)})"
        raise ArgumentError(f"analysis.sweep takes one sweep directory, given {given}; {USAGE}")
    return Path(dirs[0])


class ArgumentError(ValueError):
    """A command line of analysis.sweep that names no one sweep directory, or an option it does not have."""


def main(argv=None) -> None:
    """The command line: summarise one sweep directory (sweep_dir_argument) and print its summary.md; a bad
    argument, a path that is no sweep directory or a summary that cannot be written is one line, exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from infer.validate import env_threads

    try:
        env_threads()  # the models read it once a job's metrics are read: a traceback there
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        sweep_dir = sweep_dir_argument(argv)
        result = summarize(sweep_dir)
    except (ArgumentError, FileNotFoundError, NotASweep, SummaryWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print((sweep_dir / "summary.md").read_text())
    print("wrote " + ", ".join(str(p) for p in result["files"]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("arviz").setLevel(logging.WARNING)  # "arviz_base not installed": its preview API, unused
    main()
