"""summary.md of a sweep: how many runs and jobs, what was left out or dropped, the overrides fixed across the
sweep, the aggregated table (mean ± sd over seeds), the per-run table, and the failed and missing jobs."""
import math
import os
from pathlib import Path

from .aggregate import _metric
from .jobs import _norm, _overrides, task_overrides
from .summary_text import _site, rate_terms_note


# The per-configuration table's columns beyond the loss terms: metrics.json key -> header, each with its estimator
# ({est}: the headline's, whose value it is computed from); COLUMN_NOTES say what they are.
EXTRA_COLUMNS = {"exact.nll": "NLL [exact]", "exact.gap": "ELBO gap [exact]",
                 "gap_to_gaussian_optimum": "above the Gaussian optimum [{est}]", "khat.max": "k̂ max [PSIS]",
                 "surgery.mutual_info": "I_q(x;z) [exact]", "surgery.marginal_kl": "KL(q(z)‖p(z)) [exact]"}
RUN_COLUMNS = {"loss_se": "loss_se [loss_estimator]", "recon_per_dim": "recon_per_dim [loss_estimator]",
               "exact.loss": "exact.loss [exact]", "khat.max": "khat.max [PSIS]", "wall_seconds": "training s"}
COLUMN_NOTES = {"exact.nll": "NLL = -log p(x) of the model", "exact.gap": "ELBO gap = loss - NLL",
                "gap_to_gaussian_optimum": "above the Gaussian optimum: the loss minus the best loss any Gaussian "
                                           "encoder reaches (the 1-D vae with equal weights)",
                "khat.max": "k̂ max: the PSIS tail index of p(x,z)/q(z|x) at the worse data point (importance draws; "
                            "left out where the weights are nearly constant, ESS/S ≥ 0.99: q matches the posterior up "
                            "to noise, and k̂ fits a shape to that noise)",
                "surgery.mutual_info": "I_q(x;z) and KL(q(z)‖p(z)): the ELBO surgery of the top latent z (z2 of the "
                                       "dlgm), avg KL(q(z|x)‖p(z)) = I_q(x;z) + KL(q(z)‖p(z))"}


def _override_header(column: str) -> str:
    """A varying override's column header: its key; 'model option' where the model (guide) column shows the
    option's name, which an option of one's own may share with another (see aggregate._named_groups)."""
    key = column.split(":", 1)[1]
    return f"{key} option" if key in ("model", "guide") else key


def _pm(mean, sd, digits=4, sci=False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    if sci:
        f = lambda v: f"{v:.{digits - 1}e}"  # noqa: E731
    elif 0 < abs(mean) < 10 ** (1 - digits):  # too small for the decimals (an ELBO gap of 2e-5 would read 0.0000)
        f = lambda v: f"{v:.2e}"  # noqa: E731
    else:
        f = lambda v: f"{v:.{digits}f}"  # noqa: E731
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


def _se_tag(runs) -> str:
    """The estimators whose standard errors the loss SE column holds: the runs' loss_estimator values other than
    exact (which has none), e.g. 'RQMC lattice' or 'MC / RQMC lattice'; 'Monte Carlo' where the runs name none."""
    tags = sorted({str(t) for t in runs.get("loss_estimator", []) if isinstance(t, str) and t and t != "exact"})
    return " / ".join(tags) or "Monte Carlo"


def _md_table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _tagged(cell: str, r, tag) -> str:
    """A cell with ' [estimator]' after it when it is a headline cell of a table whose rows differ in estimator
    (tag 'headline'); an empty cell stays empty, as a run without the value has no estimator to name."""
    return f"{cell} [{r.get('loss_estimator')}]" if tag == "headline" and cell else cell


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


def _units(jobs) -> str:
    """The header's sentence on units: nats per data point; where any run weights its data points unequally
    (metrics.json 'weights', flattened to weights.x0, ...), also which runs, their weights w and floors H(w)
    (entropy_floor), and that their loss is the w-weighted mean, whose floor is H(w), not 0."""
    cols = [c for c in jobs if c.startswith("weights.x")]
    weighted = jobs[jobs[cols].notna().any(axis=1)] if cols else jobs.iloc[:0]
    if weighted.empty:
        return "Units: nats per data point."
    floors = {}
    for _, r in weighted.iterrows():
        w = "/".join(f"{r[c]:g}" if isinstance(r[c], float) else str(r[c]) for c in cols
                     if not (isinstance(r[c], float) and math.isnan(r[c])))  # a weight of the wrong kind as it is
        floor = r.get("entropy_floor")
        floors[w] = f"w = {w}, H(w) = {floor:.4f}" if isinstance(floor, float) and not math.isnan(floor) else f"w = {w}"
    who = "every run" if len(weighted) == len(jobs) else f"{len(weighted)} of the {len(jobs)} runs"
    return (f"Units: nats per data point; where the data weights w are unequal ({who}: {'; '.join(floors.values())}) "
            "the loss is the w-weighted mean over the data points, whose floor is H(w), not 0.")


def _notes(ok) -> list:
    """summary.md's lines '## Notes' and '- NOTE `job`: ...' for the ok runs whose row records a problem (error: a
    config.yaml or status.json that cannot be read); [] where none does."""
    if "error" not in ok:
        return []
    noted = ok[ok["error"].fillna("").astype(str) != ""]
    if noted.empty:
        return []
    return ["## Notes", ""] + [f"- NOTE `{r['job']}`: {r['error']}" for _, r in noted.iterrows()] + [""]


def _console(job_id, sweep_dir: Path) -> str:
    """' (submitit job <id>; ...)': where a failed job's console output is, for a job a submitit launcher ran (its
    status.json's launcher_job); '' for another."""
    if not isinstance(job_id, str) or not job_id:
        return ""
    logs = sweep_dir / ".submitit" / job_id  # the launchers' default submitit_folder: <sweep dir>/.submitit/%j
    return f" (submitit job {job_id}" + (f"; its console output is in `.submitit/{job_id}/`)" if logs.is_dir() else ")")


def _empty_folders(sweep_dir: Path) -> list:
    """The names of sweep_dir's empty folders (not hidden ones, nor _refused/), sorted."""
    found = []
    try:
        for entry in os.scandir(sweep_dir):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith((".", "_")):
                with os.scandir(entry.path) as inside:
                    if next(inside, None) is None:
                        found.append(entry.name)
    except OSError:
        pass
    return sorted(found)


def recipes_note(jobs) -> str:
    """The runs that composed a recipe (metrics.json 'recipe': conf/recipe/<objective>_<model>.yaml, whose settings
    replace the model option's defaults), counted per recipe: a configuration's model name alone does not say it."""
    counts = jobs["recipe"].dropna().value_counts().sort_index()
    listed = "; ".join(f"`{path}` in {_plural(int(k), 'run')}" for path, k in counts.items())
    return (f"Recipes (settings composed after the model's own defaults for an objective and model; each run's "
            f".hydra/config.yaml holds them): {listed}.")


def markdown(jobs, agg, missing, sweep_dir, launched=None, left_out=(), fixed=()) -> str:
    """summary.md: how many runs and jobs, what was left out or dropped, the overrides fixed across the sweep, the
    aggregated table, the per-run table, notes on ok runs (_notes), failed and missing jobs. launched: this sweep's
    job directories (replicas make several runs per job); left_out: job directories of other launches; fixed:
    fixed_overrides."""
    sweep_dir = Path(sweep_dir)
    failed = jobs[jobs["status"] != "ok"]
    dupes = jobs[jobs["duplicate_of"].notna()] if "duplicate_of" in jobs else jobs.iloc[:0]
    n_jobs = len(jobs) if launched is None else len(launched)
    runs = f"{_plural(len(jobs), 'run')} in {_plural(n_jobs, 'job')}"
    runs += " (replicas: one run per seed)" if n_jobs != len(jobs) else ""
    parts = [f"# Sweep summary: {sweep_dir}", "",
             f"{runs}: {int((jobs['status'] == 'ok').sum())} ok, {len(failed)} not ok "
             f"({', '.join(f'{v} {k}' for k, v in failed['status'].value_counts().items()) or 'none'}); "
             f"{_plural(len(missing), 'job')} missing. {_units(jobs)} Seeds aggregated as mean ± sd.", ""]
    if left_out:
        parts += [f"Left out: {_plural(len(left_out), 'job directory')} of other launches into this folder "
                  f"(their overrides and job numbers match no job of this sweep's multirun.yaml): "
                  f"{_names(left_out, sweep_dir)}.", ""]
    if not dupes.empty:
        parts += [f"Dropped: {_plural(len(dupes), 'duplicate run')} (a configuration and seed another run also "
                  f"has: overlapping replicas, or one configuration run twice, from the command line or Python), "
                  f"counted once in the means, sd and seeds: "
                  + "; ".join(f"`{r['job']}` = `{r['duplicate_of']}`" for _, r in dupes.iterrows()) + ".", ""]
    if fixed:
        parts += ["Fixed (the same in every run): " + ", ".join(f"`{o}`" for o in fixed) + ".", ""]
    if "recipe" in jobs and jobs["recipe"].notna().any():
        parts += [recipes_note(jobs), ""]
    if not agg.empty:
        loss_col, loss_est = _metric(agg, "loss")
        rec_col, rec_est = _metric(agg, "recon_per_dim")
        sites = sorted({c[3:-5] for c in agg if c.startswith("kl.") and c.endswith("_mean")})
        sites = [] if sites == ["z"] else sites  # one latent site: its term is the rate column itself
        rate_col = "exact.rate" if loss_est == "exact" and "exact.rate_mean" in agg else "rate"
        extra = [c for c in EXTRA_COLUMNS if f"{c}_mean" in agg]
        okeys = [c for c in agg if c.startswith("override:")]
        se_tag = _se_tag(jobs[jobs["status"] == "ok"])
        header = (["model", "guide", "n"] + [_override_header(c) for c in okeys] + ["seeds", f"loss [{loss_est}]"]
                  + ([] if loss_est == "exact" else [f"loss SE [{se_tag}] (mean of per-run SEs)"])
                  + [f"recon/dim [{rec_est}]"]
                  + ([f"rate (= KL) [{loss_est}]"] if f"{rate_col}_mean" in agg else [])
                  + [f"rate[{_site(s)}] [{loss_est}]" for s in sites]
                  + [EXTRA_COLUMNS[c].format(est=loss_est) for c in extra])
        body = []
        for _, r in agg.iterrows():
            seeds, runs = int(r["seeds"]), int(r.get("runs", r["seeds"]))  # runs: failed ones too (aggregate)
            row = ([r["model"], r["guide"], r["n"]] + [r[c] for c in okeys]
                   + [seeds if runs <= seeds else f"{seeds} of {runs} ({runs - seeds} not ok)"])
            row.append(_tagged(_cell(r, loss_col), r, loss_est))
            if loss_est != "exact":
                row.append(_se_cell(r))
            row.append(_tagged(_cell(r, rec_col, digits=3, sci=True), r, rec_est))
            if f"{rate_col}_mean" in agg:
                row.append(_tagged(_cell(r, rate_col), r, loss_est if rate_col == "rate" else None))
            row += [_tagged(_cell(r, f"kl.{s}"), r, loss_est) for s in sites]
            row += [_tagged(_cell(r, c), r, loss_est if "{est}" in EXTRA_COLUMNS[c] else None) for c in extra]
            body.append(row)
        parts += ["## By configuration", "", _md_table(header, body), ""]
        if loss_est != "exact":
            parts += [f"loss SE [{se_tag}]: the mean over a configuration's runs of each run's own standard error of "
                      "its Monte Carlo headline (how precisely one run's loss is estimated), not the sd over seeds "
                      "(the ± of the loss column); 'no error bar (k of N)': only k of its N runs have a standard "
                      "error that holds (a run has one only where its tail k̂ is below 0.5 by 2 of its sd: finite "
                      "variance, so a CLT standard error holds).", ""]
        if sites:
            parts += [rate_terms_note(sites) + ".", ""]
        notes = [COLUMN_NOTES[c] for c in extra if c in COLUMN_NOTES]
        if notes:
            parts += ["; ".join(notes) + ".", ""]
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
        parts += ["## Runs", "", _md_table([RUN_COLUMNS.get(c, c) for c in cols], body), ""]
    parts += _notes(ok)
    parts += ["## Failed and missing jobs", ""]
    if failed.empty and not missing:
        parts.append("None.")
    for _, r in failed.iterrows():
        parts.append(f"- {str(r['status']).upper()} `{r['job']}` ({r['overrides'] or 'no overrides'}): "
                     f"{r.get('error') or 'no reason recorded'}{_console(r.get('launcher_job'), sweep_dir)}")
    taken = {_norm(_overrides(Path(d))): d for d in left_out}
    for m in missing:
        other = taken.get(_norm(m.split()))
        parts.append(f"- MISSING {m} (no job directory of this sweep" + (
            f"; its directory {_names([other], sweep_dir)} holds another launch's job)" if other else ")"))
    for name in _empty_folders(sweep_dir) if missing else []:
        parts.append(f"- EMPTY `{name}/`: a folder of the sweep dir that holds nothing, the dir of a missing job "
                     "that could not write into it (a full disk, a read-only folder) or was killed before it began")
    for d in (d for d in left_out if task_overrides(Path(d)) is None):
        parts.append(f"- UNREADABLE {_names([d], sweep_dir)}: neither its .hydra/overrides.yaml nor its "
                     ".hydra/hydra.yaml can be read, so which job it ran is unknown")
    return "\n".join(parts) + "\n"
