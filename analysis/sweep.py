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
* loss_vs_n.png, recon_per_dim_vs_n.png, encodings_grid.png.
"""
import itertools
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("onebit.sweep")
LN2 = math.log(2.0)
ID_COLUMNS = ("job", "status", "duplicate_of", "model", "guide", "n", "seed", "beta", "overrides")
# The original study's numbers (RuiShu/one-bit-vae; Monte Carlo, one draw per row), see seed/REFERENCE.md
ORIGINAL = {"vae": {1: (0.69315, 0.69254), 5: (1.06633, 2.788e-2), 10: (1.14074, 9.561e-3),
                    100: (1.42624, 1.476e-3), 1000: (1.48595, 4.282e-5)},
            "dlgm": {1: (0.69319, 0.69304), 5: (0.72147, 1.955e-3), 10: (0.72381, 9.198e-5),
                     100: (0.72214, 2.292e-5), 1000: (0.75055, 2.227e-6)}}


# ---------------------------------------------------------------------------------------------------------------
# reading jobs


def _yaml(path: Path):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def select(cfg: dict, key: str, default=None):
    """The value at a dotted key path of a container config, or default where the path does not exist."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested metric blocks as flat columns: {"kl": {"z": 1}} -> {"kl.z": 1}; short numeric lists are indexed
    (khat -> khat.x0, khat.x1, plus khat.max); long lists are dropped."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            if 0 < len(v) <= 8 and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
                out.update({f"{key}.x{i}": float(e) for i, e in enumerate(v)})
                if k == "khat" or k.endswith("khat"):
                    out[f"{key}.max"] = float(max(v))
        else:
            out[key] = v
    return out


def _candidates(sweep_dir: Path) -> list:
    """Every directory below sweep_dir that holds .hydra/ or metrics.json (a job, or a replica of one), sorted."""
    found = {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir() and p.parent != sweep_dir}
    return sorted(found)


def _launches(candidates: list) -> dict:
    """{launched job dir: [its run dirs]}: a candidate with no candidate above it is a job Hydra launched; the
    candidates below it are its replicas' dirs (one run per seed). A job with replicas (status.json lists them,
    or replica dirs exist) is not a run itself; any other job is its own one run."""
    from .rundir import read_status

    known = set(candidates)
    tops = [c for c in candidates if not any(a in known for a in c.parents)]
    out = {}
    for top in tops:
        below = [c for c in candidates if top in c.parents]
        out[top] = below if below or read_status(top).get("replicas") else [top]
    return out


def _overrides(job: Path) -> list:
    """The job's task overrides (.hydra/overrides.yaml), [] when it has none."""
    path = job / ".hydra" / "overrides.yaml"
    try:
        return [str(o) for o in (_yaml(path) or [])] if path.exists() else []
    except Exception:  # a half-written file: the job matches no combination
        return []


def _hydra_job(job: Path) -> tuple:
    """(mode, number) of a launched job from its .hydra/hydra.yaml (hydra.mode: RUN for a single run, MULTIRUN for a
    sweep's job; hydra.job.num), each None where it is not recorded."""
    path = job / ".hydra" / "hydra.yaml"
    try:
        cfg = (_yaml(path) or {}) if path.exists() else {}
    except Exception:
        cfg = {}
    mode, num = select(cfg, "hydra.mode"), select(cfg, "hydra.job.num")
    return (str(mode) if mode is not None else None), (int(num) if str(num).isdigit() else None)


def job_dirs(sweep_dir: Path) -> tuple:
    """(runs, launched, left_out, missing) of the sweep last launched into sweep_dir.

    Its jobs are the combinations of its multirun.yaml (expected_jobs, in Hydra's order: job number i runs
    combination i). A launched job directory belongs to this sweep when its overrides are one of them and, where
    its hydra.yaml records a job number, that number is the combination's. A job directory left by an earlier
    launch into the same folder (overwrite=true is itself an override, so a re-run never matches an old job), by
    a sweep started at the same time, or by a single run (hydra.mode RUN) matches none: it is left out. runs: the
    run directories of this sweep's jobs (a replica's dir per seed, sorted); launched: its job directories;
    left_out: the job directories of other launches; missing: the override strings of combinations without a
    job directory of this launch. Without a multirun.yaml that can be expanded every job directory counts and
    missing is []."""
    launches = _launches(_candidates(sweep_dir))
    expected = expected_jobs(sweep_dir)
    if not expected:
        return sorted(r for runs in launches.values() for r in runs), sorted(launches), [], []
    index = {}
    for i, combo in enumerate(expected):
        index.setdefault(_norm(combo), set()).add(i)
    launched, left_out, done = [], [], set()
    for job in sorted(launches):
        nums = index.get(_norm(_overrides(job)), set())
        mode, num = _hydra_job(job)
        if nums and mode != "RUN" and (num is None or num in nums):
            launched.append(job)
            done |= {num} if num is not None else nums
        else:
            left_out.append(job)
    missing = [" ".join(combo) for i, combo in enumerate(expected) if i not in done]
    return sorted(r for job in launched for r in launches[job]), launched, left_out, missing


def read_job(job: Path, sweep_dir: Path) -> dict:
    """One row: status, overrides, config summary (model, guide, n, seed) and flattened metrics."""
    row = {"job": str(job.relative_to(sweep_dir)) if job != sweep_dir else ".", "status": "ok"}
    overrides, cfg = [], {}
    if (job / ".hydra" / "overrides.yaml").exists():
        overrides = [str(o) for o in (_yaml(job / ".hydra" / "overrides.yaml") or [])]
    if (job / ".hydra" / "config.yaml").exists():
        try:
            cfg = _yaml(job / ".hydra" / "config.yaml") or {}
        except Exception as err:  # a half-written config: still list the job
            row["error"] = f"config.yaml unreadable: {err}"
    row["overrides"] = " ".join(overrides)
    row["_overrides"] = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    row.update({"model": select(cfg, "model.name"), "guide": select(cfg, "guide.name"),
                "n": select(cfg, "data.n"), "seed": select(cfg, "seed"), "beta": select(cfg, "train.beta")})
    from .rundir import read_status

    status = read_status(job)
    if status.get("status") not in (None, "ok"):  # refused, diverged, failed, or still running (killed)
        row["status"] = status["status"]
        row["error"] = status.get("reason") or ("killed or still running" if status["status"] == "running" else "")
        if status["status"] != "diverged" or not (job / "metrics.json").exists():
            return row
    metrics_path = job / "metrics.json"
    if not metrics_path.exists():
        row["status"] = "failed"
        row["error"] = row.get("error") or "no metrics.json (and no status.json: killed before it started?)"
        return row
    try:
        metrics = json.loads(metrics_path.read_text())
    except ValueError as err:
        row["status"], row["error"] = "failed", f"metrics.json unreadable: {err}"
        return row
    for key in ("model", "guide", "n", "seed"):
        if row[key] is None and key in metrics:
            row[key] = metrics[key]
    row.update({k: v for k, v in flatten(metrics).items() if k not in ("model", "guide", "n", "seed", "status")})
    if (job / "encodings.nc").exists():
        row["encodings"] = str(job / "encodings.nc")
    return row


def expected_jobs(sweep_dir: Path) -> list:
    """The override lists of every job the sweep was meant to run (from multirun.yaml), or [] if unknown."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return []
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        cfg = _yaml(path)
        task = list(select(cfg, "hydra.overrides.task", []) or [])
        params = select(cfg, "hydra.sweeper.params", {}) or {}
        args = [f"{k}={v}" for k, v in params.items()] + task
        parsed = OverridesParser.create().parse_overrides(args)
        keys, axes, seen = [], [], {}
        for o in parsed:
            key = o.get_key_element()
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            if key in seen:  # the command line overrides the config's sweep params
                axes[seen[key]] = values
            else:
                seen[key] = len(keys)
                keys.append(key)
                axes.append(values)
        return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*axes)]
    except Exception as err:  # an exotic sweeper: no missing-job check
        log.warning("could not expand the sweep in %s (%s); missing jobs are not checked", path, err)
        return []


def _norm(overrides) -> frozenset:
    return frozenset(str(o).lstrip("+~").replace(" ", "") for o in overrides)


def collect(sweep_dir) -> dict:
    """This sweep's runs (job_dirs): dict(rows=[one row per run dir], launched=[its job dirs], left_out=[job dirs of
    other launches], missing=[override strings of its jobs without a directory])."""
    sweep_dir = Path(sweep_dir)
    runs, launched, left_out, missing = job_dirs(sweep_dir)
    return {"rows": [read_job(j, sweep_dir) for j in runs], "launched": launched, "left_out": left_out,
            "missing": missing}


# ---------------------------------------------------------------------------------------------------------------
# tables


def _group_keys(rows) -> list:
    """Aggregation keys: model, guide, n and every other override key that varies, except the seed."""
    skip = {"seed", "model", "guide", "data.n", "hydra.job.chdir"}
    keys = sorted({k for r in rows for k in r["_overrides"] if k not in skip
                   and len({str(q["_overrides"].get(k)) for q in rows}) > 1})
    return ["model", "guide", "n"] + [f"override:{k}" for k in keys]


def fixed_overrides(rows) -> list:
    """The overrides every run of the sweep shares, as sorted 'key=value' strings (no column of the tables)."""
    if not rows:
        return []
    keys = set.intersection(*(set(r["_overrides"]) for r in rows))
    return sorted(f"{k}={rows[0]['_overrides'][k]}" for k in keys
                  if len({str(r["_overrides"][k]) for r in rows}) == 1)


def _tally(values) -> str:
    """The one value of a text column over a configuration's runs, or 'a (k of N), b (m of N)' when they differ."""
    from collections import Counter

    values = ["MC" if v is None or str(v) in ("nan", "None", "<NA>") else str(v) for v in values]
    counts = Counter(values)
    if len(counts) == 1:
        return values[0]
    return ", ".join(f"{v} ({k} of {len(values)})" for v, k in counts.most_common())


def _worst_estimator(runs) -> str:
    """The estimator texts of a configuration's runs: of those with an integration error (loss_error), the text of
    the run with the largest; then each text of the others once (a Monte Carlo headline), joined by '; '."""
    import pandas as pd

    error = pd.to_numeric(runs["loss_error"], errors="coerce") if "loss_error" in runs else \
        pd.Series(float("nan"), index=runs.index)
    texts = [str(runs.loc[error.idxmax(), "estimator"])] if error.notna().any() else []
    for text in runs.loc[error.isna(), "estimator"].dropna().astype(str):
        if text not in texts:
            texts.append(text)
    return "; ".join(texts)


def _mark_duplicates(jobs, keys) -> None:
    """Set duplicate_of on every ok run whose (configuration, seed) an earlier ok run of the table already has
    (replicas of two jobs overlapping in seeds train the same run twice): the first is kept, the others name it."""
    ok = jobs[(jobs["status"] == "ok") & jobs["seed"].notna()]
    first = {}
    for i, key in ok[keys + ["seed"]].astype(str).apply(tuple, axis=1).items():
        if key in first:
            jobs.at[i, "duplicate_of"] = jobs.at[first[key], "job"]
        else:
            first[key] = i


def _counted(jobs):
    """The runs every mean, seed count and figure is over: the ok ones that repeat no earlier run (duplicate_of
    empty; _mark_duplicates). Without a status or duplicate_of column, that filter is not applied."""
    ok = jobs[jobs["status"] == "ok"] if "status" in jobs else jobs
    return ok[ok["duplicate_of"].isna()] if "duplicate_of" in ok else ok


def tables(rows) -> tuple:
    """(jobs, aggregated) DataFrames. jobs: one row per run; duplicate_of names the run a duplicate (same
    configuration and seed) repeats. aggregated: per configuration over its ok runs without duplicates, seeds (the
    number of runs) and <metric>_mean, <metric>_sd, <metric>_count (the runs that have the metric);
    loss_estimator is the runs' one estimator or their tally, estimator the text of the run with the largest
    integration error."""
    import pandas as pd

    jobs = pd.DataFrame([{**{k: v for k, v in r.items() if k != "_overrides"},
                          **{f"override:{k}": v for k, v in r["_overrides"].items()
                             if k not in ("seed", "model", "guide", "data.n")}} for r in rows])
    for col in ID_COLUMNS:
        if col not in jobs:
            jobs[col] = None
    front = [c for c in ID_COLUMNS if c in jobs] + sorted(c for c in jobs if c.startswith("override:"))
    jobs = jobs[front + [c for c in jobs if c not in front]]
    for col in ("n", "seed"):
        jobs[col] = pd.to_numeric(jobs[col], errors="coerce").astype("Int64")
    jobs = jobs.sort_values(["model", "guide", "n", "seed", "job"], na_position="last",
                            key=lambda c: c.astype(str) if c.dtype == object else c).reset_index(drop=True)
    keys = [k for k in _group_keys(rows) if k in jobs]
    jobs["duplicate_of"] = jobs["duplicate_of"].astype(object)
    _mark_duplicates(jobs, keys)
    ok = _counted(jobs)
    numeric = [c for c in ok.columns if c not in ID_COLUMNS and c not in keys
               and pd.api.types.is_numeric_dtype(ok[c]) and not ok[c].isna().all()]
    if ok.empty:
        return jobs, pd.DataFrame(columns=keys + ["seeds"])
    grouped = ok.fillna({k: "" for k in keys}).groupby(keys, dropna=False, sort=True)
    agg = grouped[numeric].agg(["mean", "std", "count"])
    agg.columns = [f"{m}_{'sd' if s == 'std' else s}" for m, s in agg.columns]
    agg = pd.concat([grouped.size().rename("seeds"), agg], axis=1).reset_index()
    if "loss_estimator" in ok:
        agg["loss_estimator"] = [_tally(runs["loss_estimator"]) for _, runs in grouped]
    if "estimator" in ok:
        agg["estimator"] = [_worst_estimator(runs) for _, runs in grouped]
    return jobs, agg


def _pm(mean, sd, digits=4, sci=False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    f = (lambda v: f"{v:.{digits - 1}e}") if sci else (lambda v: f"{v:.{digits}f}")
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return f(mean)
    return f"{f(mean)} ± {f(sd)}"


def _count(r, col):
    """(k, N): how many of a configuration's N runs have the metric col (k = N where no count is recorded)."""
    k = r.get(f"{col}_count")
    n = int(r["seeds"])
    return (n if k is None or (isinstance(k, float) and math.isnan(k)) else int(k)), n


def _cell(r, col, digits=4, sci=False) -> str:
    """'mean ± sd' of a metric over a configuration's runs, with '(k of N)' where only k of its N runs have it."""
    text = _pm(r.get(f"{col}_mean"), r.get(f"{col}_sd"), digits, sci)
    k, n = _count(r, col)
    return f"{text} ({k} of {n})" if text and k < n else text


def _se_cell(r) -> str:
    """The mean of the runs' own standard errors of the loss when every run of the configuration has one (an error
    bar that holds); 'exact' where every headline is exact; else 'no error bar (k of N)'."""
    if str(r.get("loss_estimator")) == "exact":
        return "exact (no sampling error)"
    k, n = _count(r, "loss_se")
    if "loss_se_mean" not in r or k < n:
        return f"no error bar ({k if 'loss_se_mean' in r else 0} of {n})"
    return _pm(r["loss_se_mean"], None)


def _md_table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _metric(agg, base, prefer_exact=True):
    """(column, estimator tag) of a metric in the aggregated table: its exact value (quadrature) when every run of
    every configuration has one; else the headline (metrics.json's top level: each run's most accurate estimate),
    tagged by the runs' loss_estimator, or 'headline' when the configurations' estimators differ (each row then
    names its own, see _estimator_note)."""
    col = f"exact.{base}"
    if prefer_exact and f"{col}_count" in agg and (agg[f"{col}_count"] == agg["seeds"]).all():
        return col, "exact"
    tags = sorted({str(t) for t in agg["loss_estimator"]}) if "loss_estimator" in agg else ["MC"]
    return base, tags[0] if len(tags) == 1 else "headline"


def _estimator_note(r, tag) -> str:
    """' [estimator]' after a headline cell when the table's rows differ in estimator, else ''."""
    return f" [{r.get('loss_estimator')}]" if tag == "headline" else ""


def _plural(k, noun) -> str:
    return f"{k} {noun}" if k == 1 else f"{k} {noun[:-1]}ies" if noun.endswith("y") else f"{k} {noun}s"


def _estimators(agg, okeys) -> str:
    """The configurations' estimator texts: one when they agree, else each prefixed by its configuration."""
    texts = [str(e) for e in agg["estimator"]]
    if len(set(texts)) == 1:
        return texts[0]
    label = (lambda r: f"{r['model']}, {r['guide']}, n={r['n']}"
             + "".join(f", {c.split(':', 1)[1]}={r[c]}" for c in okeys))
    return "; ".join(f"{label(r)}: {e}" for (_, r), e in zip(agg.iterrows(), texts))


def _names(dirs, sweep_dir, most=3) -> str:
    names = [f"`{Path(d).relative_to(sweep_dir) if Path(d).is_relative_to(sweep_dir) else d}`" for d in dirs]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def markdown(jobs, agg, missing, sweep_dir, launched=None, left_out=(), fixed=()) -> str:
    """summary.md: how many runs and jobs, what was left out or dropped, the overrides fixed across the sweep, the
    aggregated table, the per-run table, failed and missing jobs. launched: this sweep's job directories (replicas
    make several runs per job); left_out: job directories of other launches; fixed: fixed_overrides."""
    sweep_dir = Path(sweep_dir)
    failed = jobs[jobs["status"] != "ok"]
    dupes = jobs[jobs["duplicate_of"].notna()] if "duplicate_of" in jobs else jobs.iloc[:0]
    n_jobs = len(jobs) if launched is None else len(launched)
    runs = f"{_plural(len(jobs), 'run')} in {_plural(n_jobs, 'job')}"
    runs += " (replicas: one run per seed)" if n_jobs != len(jobs) else ""
    parts = [f"# Sweep summary: {sweep_dir}", "",
             f"{runs}: {int((jobs['status'] == 'ok').sum())} ok, {len(failed)} not ok "
             f"({', '.join(f'{v} {k}' for k, v in failed['status'].value_counts().items()) or 'none'}); "
             f"{_plural(len(missing), 'job')} missing. Units: nats per data point. Seeds aggregated as mean ± sd.", ""]
    if left_out:
        parts += [f"Left out: {_plural(len(left_out), 'job directory')} of other launches into this folder "
                  f"(their overrides and job numbers match no job of this sweep's multirun.yaml): "
                  f"{_names(left_out, sweep_dir)}.", ""]
    if not dupes.empty:
        parts += [f"Dropped: {_plural(len(dupes), 'duplicate run')} (a configuration and seed another job's "
                  f"replicas also trained), counted once in the means, sd and seeds: "
                  + "; ".join(f"`{r['job']}` = `{r['duplicate_of']}`" for _, r in dupes.iterrows()) + ".", ""]
    if fixed:
        parts += ["Fixed (the same in every run): " + ", ".join(f"`{o}`" for o in fixed) + ".", ""]
    if not agg.empty:
        loss_col, loss_est = _metric(agg, "loss")
        rec_col, rec_est = _metric(agg, "recon_per_dim")
        sites = sorted({c[3:-5] for c in agg if c.startswith("kl.") and c.endswith("_mean")})
        sites = [] if sites == ["z"] else sites  # one latent site: its term is the rate column itself
        rate_col = "exact.rate" if loss_est == "exact" and "exact.rate_mean" in agg else "rate"
        extra = [c for c in ("exact.nll", "exact.gap", "gap_to_gaussian_optimum", "khat.max", "surgery.mutual_info",
                             "surgery.marginal_kl") if f"{c}_mean" in agg]
        okeys = [c for c in agg if c.startswith("override:")]
        header = (["model", "guide", "n"] + [c.split(":", 1)[1] for c in okeys] + ["seeds", f"loss [{loss_est}]"]
                  + ([] if loss_est == "exact" else ["loss SE [MC] (mean of per-run SEs)"])
                  + [f"recon/dim [{rec_est}]"]
                  + ([f"rate (= KL) [{loss_est}]"] if f"{rate_col}_mean" in agg else [])
                  + [f"rate[{s}]" for s in sites] + extra)
        body = []
        for _, r in agg.iterrows():
            row = [r["model"], r["guide"], r["n"]] + [r[c] for c in okeys] + [int(r["seeds"])]
            row.append(_cell(r, loss_col) + _estimator_note(r, loss_est))
            if loss_est != "exact":
                row.append(_se_cell(r))
            row.append(_cell(r, rec_col, digits=3, sci=True) + _estimator_note(r, rec_est))
            if f"{rate_col}_mean" in agg:
                row.append(_cell(r, rate_col))
            row += [_cell(r, f"kl.{s}") for s in sites]
            row += [_cell(r, c) for c in extra]
            body.append(row)
        parts += ["## By configuration", "", _md_table(header, body), ""]
        if loss_est != "exact":
            parts += ["loss SE [MC]: the mean over a configuration's runs of each run's own Monte Carlo standard "
                      "error (how precisely one run's loss is estimated), not the sd over seeds (the ± of the loss "
                      "column); 'no error bar (k of N)': only k of its N runs have a standard error that holds "
                      "(a run has none where the tail k̂ is at least 0.5).", ""]
        if sites:
            parts += ["rate[s] = E_q[log q(s|.) - log p(s|parents)]: a latent site's term of the rate, not a KL (it can "
                      "be negative); only their sum, the rate, is the KL of q to the model's prior.", ""]
        if "estimator" in agg:
            parts += ["Estimators (per configuration: of its quadrature runs the one with the largest integration "
                      "error; each other estimator once): "
                      + _estimators(agg, okeys)
                      + (". [exact] columns come from quadrature (metrics.json 'exact' block)."
                         if loss_est == "exact" else ""), ""]
    ok = jobs[jobs["status"] == "ok"]
    if not ok.empty:
        cols = [c for c in ("job", "model", "guide", "n", "seed", "loss", "loss_estimator", "loss_se",
                            "recon_per_dim", "exact.loss", "khat.max", "steps", "wall_seconds") if c in ok]
        cols += ["duplicate_of"] if not dupes.empty else []
        body = [[("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                  (f"{v:.4g}" if isinstance(v, float) else v)) for v in r] for r in ok[cols].itertuples(index=False)]
        parts += ["## Runs", "", _md_table(cols, body), ""]
    parts += ["## Failed and missing jobs", ""]
    if failed.empty and not missing:
        parts.append("None.")
    for _, r in failed.iterrows():
        parts.append(f"- {str(r['status']).upper()} `{r['job']}` ({r['overrides'] or 'no overrides'}): "
                     f"{r.get('error') or 'no reason recorded'}")
    taken = {_norm(_overrides(Path(d))): d for d in left_out}
    for m in missing:
        other = taken.get(_norm(m.split()))
        parts.append(f"- MISSING {m} (no job directory of this sweep" + (
            f"; its directory {_names([other], sweep_dir)} holds another launch's job)" if other else ")"))
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# figures


def _optimum_curve(ns):
    from .optimum import gaussian_optimum

    lo, hi = max(min(ns), 1.0), max(ns)
    grid = np.unique(np.concatenate([np.geomspace(lo, hi, 12), np.asarray(ns, dtype=float)]))
    opt = [gaussian_optimum(float(n)) for n in grid]
    return grid, np.array([o["loss"] for o in opt]), np.array([o["recon_per_dim"] for o in opt])


def _series(agg, col):
    """(label, key, rows sorted by n) per curve of a sweep figure: one per model, guide and value of every other
    override that varies over the sweep (the aggregated table's override columns), so no curve merges two
    configurations. key maps those columns to the curve's values."""
    keys = ["model", "guide"] + [c for c in agg if c.startswith("override:")]
    if f"{col}_mean" not in agg:
        return
    for values, df in agg.groupby(keys, sort=True, dropna=False):
        key = dict(zip(keys, values))
        yield _label(key), key, df.sort_values("n")


def _label(key) -> str:
    """'model (guide guide, k=v, ...)' of a curve or grid row."""
    rest = [f"{k.split(':', 1)[1]}={v}" for k, v in key.items() if k.startswith("override:")]
    guide = f"{key['guide']} guide"
    return f"{key['model']} ({', '.join([guide] + rest)})"


def _runs(jobs, key):
    """The ok runs (without duplicates) of the configurations of one curve."""
    ok = _counted(jobs)
    for k, v in key.items():
        ok = ok[ok[k].fillna("").astype(str) == str(v)] if k in ok else ok.iloc[:0]
    return ok


def sweep_figures(agg, jobs, out: Path, reference: bool = True) -> list:
    """loss_vs_n.png and recon_per_dim_vs_n.png, a curve (mean ± sd over seeds) per model, guide and varying
    override; returns the paths written."""
    import seaborn as sns
    from matplotlib.figure import Figure

    written = []
    if agg.empty:
        return written
    ns = sorted(float(n) for n in agg["n"].dropna().unique())
    opt_n, opt_loss, opt_rec = _optimum_curve(ns)
    models = set(agg["model"].dropna())
    for base, name, ylog in (("loss", "loss_vs_n.png", False), ("recon_per_dim", "recon_per_dim_vs_n.png", True)):
        col, est = _metric(agg, base)
        curves = sorted(_series(agg, col), key=lambda c: (c[1]["model"] != "vae", c[0]))
        colors = sns.color_palette("deep" if len(curves) <= 10 else "husl", max(len(curves), 1))
        model_color = {}  # the reference markers take a model's colour where it has one curve, else grey
        with sns.axes_style("whitegrid"):
            fig = Figure(figsize=(6.5, 4.5), layout="constrained")
            ax = fig.subplots()
            for (label, key, df), color in zip(curves, colors):
                model_color[key["model"]] = "0.3" if key["model"] in model_color else color
                sd = df[f"{col}_sd"].fillna(0) if f"{col}_sd" in df else None
                ax.errorbar(df["n"].astype(float), df[f"{col}_mean"], yerr=sd, color=color, marker="o", ms=5,
                            capsize=3, lw=1.5, label=f"{label} [{est}]")
                seeds = _runs(jobs, key)
                if col in seeds:
                    ax.scatter(seeds["n"].astype(float), seeds[col], color=color, s=10, alpha=0.35, lw=0)
            if base == "loss":
                ax.axhline(LN2, color="0.4", ls=":", lw=1.3, label="entropy ln 2 (floor of every loss)")
            if "vae" in models:  # the optimum bounds the 1-layer vae only; a marker where one n is swept
                ax.plot(opt_n, opt_loss if base == "loss" else opt_rec, color="#d62728", ls="--", lw=1.3,
                        marker="_" if len(set(opt_n)) == 1 else None, ms=14,
                        label="Gaussian-encoder optimum of the 1-layer VAE")
            if reference:
                for model, table in ORIGINAL.items():
                    if model in models:
                        xs = sorted(table)
                        ys = [table[n][0 if base == "loss" else 1] for n in xs]
                        ax.scatter(xs, ys, marker="x" if model == "vae" else "+", s=30, alpha=0.8,
                                   color=model_color.get(model, "0.3"),
                                   label=f"{model}: original study (MC)")
            ax.set_xscale("log")
            values = agg[f"{col}_mean"].dropna()
            if ylog or (len(values) and values.min() > 0 and values.max() / values.min() > 5):
                from matplotlib.ticker import FuncFormatter

                ax.set_yscale("log")
                if not ylog:
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
                    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if str(y)[0] in "2357" else ""))
            ax.set_xlabel("n (bits per data point)")
            ax.set_ylabel("loss (nats per data point)" if base == "loss" else "recon / n (nats per bit)")
            ax.set_title(("Loss" if base == "loss" else "Reconstruction per dimension")
                         + " against n (mean ± sd over seeds; dots: seeds)", fontsize=10)
            ax.legend(fontsize=7)
        fig.savefig(out / name, dpi=110)
        written.append(out / name)
    return written


def encodings_figure(jobs, out: Path):
    """encodings_grid.png: a row per model, guide and varying override (as the curves of sweep_figures), a column
    per n, each cell from the lowest-seed run with an encodings.nc; None if there is none."""
    from .encodings import load
    from .figures import encoding_grid

    if "encodings" not in jobs:
        return None
    keys = ["model", "guide"] + [c for c in jobs if c.startswith("override:")
                                 and jobs[c].fillna("").astype(str).nunique() > 1]
    labels = jobs[keys].fillna("").astype(str).apply(lambda r: _label(dict(r)), axis=1)
    ok = _counted(jobs)
    ok = ok[ok["encodings"].notna()]
    if ok.empty:
        return None
    ok = ok.assign(label=labels).sort_values(["seed", "job"], kind="stable")
    cells = {}
    for (label, n), df in ok.groupby(["label", "n"]):
        try:
            cells[(label, int(n))] = load(df.iloc[0]["encodings"])
        except Exception as err:
            log.warning("could not read %s: %s", df.iloc[0]["encodings"], err)
            cells[(label, int(n))] = None
    rows = {m for m, _ in cells} | set(labels[jobs["model"].notna()])
    ns = {n for _, n in cells} | {int(n) for n in jobs["n"].dropna()}
    for key in itertools.product(rows, ns):
        cells.setdefault(key, None)
    encoding_grid(cells, out / "encodings_grid.png",
                  title="Top latent per model, guide and varying override (rows) and n (columns), lowest seed: "
                        "p(z) grey, q(z) black, mass q(z) misses red, q(z|x_k) solid, true p(z|x_k) dashed")
    return out / "encodings_grid.png"


def _rd_value(row, key):
    """A run's exact rate or distortion, else its Monte Carlo one (None when neither is known)."""
    for col in (f"exact.{key}", key, f"montecarlo.{key}"):
        value = row.get(col)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None


def rate_distortion_figure(jobs, out: Path):
    """rate_distortion.png (analysis.frontier.rd_plane) when the ok runs span more than one beta or more than one
    model/guide family; None otherwise."""
    from .frontier import rd_plane

    ok = _counted(jobs)
    if ok.empty:
        return None
    betas = {float(b) for b in ok["beta"].dropna()} if "beta" in ok else set()
    families = {(m, g) for m, g in zip(ok["model"], ok["guide"])}
    if len(betas) < 2 and len(families) < 2:
        return None
    points = []
    for _, r in ok.iterrows():
        rate, dist = _rd_value(r, "rate"), _rd_value(r, "distortion")
        if rate is None or dist is None:
            continue
        points.append({"rate": rate, "distortion": dist, "model": r["model"], "guide": r["guide"],
                       "beta": float(r["beta"]) if r.get("beta") is not None else 1.0, "n": int(r["n"])})
    if not points:
        return None
    rd_plane(points, out / "rate_distortion.png", ns=sorted({p["n"] for p in points}))
    return out / "rate_distortion.png"


def summarize(sweep_dir, figures: bool = True) -> dict:
    """Read this sweep's runs (job_dirs: only the jobs of its multirun.yaml) and write summary.csv,
    summary_by_config.csv, summary.md and the sweep figures.

    Returns dict(jobs=DataFrame (one row per run), aggregated=DataFrame, failed=[run dirs], missing=[override
    strings], launched=[this sweep's job dirs], left_out=[job dirs of other launches], duplicates=[run dirs
    dropped from the means], files=[paths written])."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    found = collect(sweep_dir)
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
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print((Path(argv[0]) / "summary.md").read_text())
    print("wrote " + ", ".join(str(p) for p in result["files"]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
