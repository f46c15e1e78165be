"""Summaries of a Hydra sweep directory: summary.csv, summary.md and the sweep figures.

    python -m analysis.sweep multirun/2026-01-01/12-00-00

The sweep's jobs are those of its multirun.yaml: a job directory counts when its overrides are one of the sweep's
combinations and its job number is that combination's (job_dirs); directories of an earlier launch into the same
folder, of another sweep or of a single run are left out, and the summary says how many. A job with replicas is
one run per seed (its replica directories). A run without metrics.json is a failed run; a combination without a
job directory of this launch is listed as missing. Without a multirun.yaml every job directory below counts.

Outputs, in the sweep directory:
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
import sys
from pathlib import Path

from .aggregate import ID_COLUMNS, fixed_overrides, tables
from .jobs import collect, expected_jobs, flatten, job_dirs, read_job, select
from .summary_md import markdown
from .sweep_figures import LN2, ORIGINAL, encodings_figure, rate_distortion_figure, sweep_figures

log = logging.getLogger("onebit.sweep")
__all__ = ["ID_COLUMNS", "LN2", "ORIGINAL", "collect", "encodings_figure", "expected_jobs", "fixed_overrides",
           "flatten", "job_dirs", "main", "markdown", "rate_distortion_figure", "read_job", "select", "summarize",
           "sweep_figures", "tables"]


class NotASweep(ValueError):
    """A directory that holds no sweep to summarise (a single run's, or one without job directories)."""


def summarize(sweep_dir, figures: bool = True, ended: bool = False) -> dict:
    """Read this sweep's runs (job_dirs: only the jobs of its multirun.yaml) and write summary.csv,
    summary_by_config.csv, summary.md and the sweep figures.

    Returns dict(jobs=DataFrame (one row per run), aggregated=DataFrame, failed=[run dirs], missing=[override
    strings], launched=[this sweep's job dirs], left_out=[job dirs of other launches], duplicates=[run dirs
    dropped from the means], files=[paths written])."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    from .rundir import is_run, read_status

    if is_run(sweep_dir) and not (sweep_dir / "multirun.yaml").exists() and not read_status(sweep_dir).get("replicas"):
        raise NotASweep(f"{sweep_dir} is a single run's directory (it holds a run's status.json), not a sweep's or a "
                        "replica group's: give the folder that holds the sweep's multirun.yaml and job directories")
    found = collect(sweep_dir, ended)  # ended: every job has returned (the sweep's end callback)
    if not found["rows"] and not found["missing"] and not (sweep_dir / "multirun.yaml").exists():
        raise NotASweep(f"{sweep_dir} holds no sweep (no multirun.yaml and no job directory): give the folder a "
                        "`python run.py -m` sweep wrote (hydra.sweep.dir)")
    jobs, agg = tables(found["rows"])
    missing = found["missing"]
    files = [sweep_dir / "summary.csv", sweep_dir / "summary_by_config.csv", sweep_dir / "summary.md"]
    jobs.to_csv(files[0], index=False)
    agg.to_csv(files[1], index=False)
    files[2].write_text(markdown(jobs, agg, missing, sweep_dir, launched=found["launched"],
                                 left_out=found["left_out"], fixed=fixed_overrides(found["rows"])))
    if figures:
        for step in (lambda: sweep_figures(agg, jobs, sweep_dir), lambda: [encodings_figure(jobs, sweep_dir)],
                     lambda: [rate_distortion_figure(jobs, sweep_dir)]):
            try:
                files += [p for p in step() if p is not None]
            except Exception as err:  # a broken figure must not hide the tables
                log.warning("sweep figure failed: %s: %s", type(err).__name__, err)
    failed = list(jobs.loc[jobs["status"] != "ok", "job"])
    duplicates = list(jobs.loc[jobs["duplicate_of"].notna(), "job"])
    return {"jobs": jobs, "aggregated": agg, "failed": failed, "missing": missing, "files": files,
            "launched": [str(p.relative_to(sweep_dir)) for p in found["launched"]],
            "left_out": [str(p.relative_to(sweep_dir)) for p in found["left_out"]], "duplicates": duplicates}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m analysis.sweep SWEEP_DIR", file=sys.stderr)
        sys.exit(2)
    try:
        result = summarize(argv[0])
    except (FileNotFoundError, NotASweep) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print((Path(argv[0]) / "summary.md").read_text())
    print("wrote " + ", ".join(str(p) for p in result["files"]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("arviz").setLevel(logging.WARNING)  # "arviz_base not installed": its preview API, unused
    main()
