"""A sweep's rows as tables: one row per run, with the runs that repeat a (configuration, seed) marked, and the
seeds aggregated per configuration (mean, sd and count of the runs that have each metric); _metric names the column
and estimator a summary shows for a metric."""
# Keys that change no number a run writes: the summary leaves them out of its configurations, a run resumed in place
# may change them, and conf/config.yaml leaves them out of a sweep's job dir names (override_dirname.exclude_keys,
# which a test holds equal to this).
NO_RESULT_KEYS = ("overwrite", "eval.figures", "train.progress")
ID_COLUMNS = ("job", "status", "duplicate_of", "model", "guide", "n", "seed", "beta", "overrides")


def _named_groups(rows) -> set:
    """The groups among model and guide whose option every run's name column says (model=vae: model vae); where
    an option is named otherwise (an option of one's own under --config-dir, say model=bigvae named vae), its
    override stays a key of its own, so that two options are never taken for one configuration."""
    return {g for g in ("model", "guide") if all(str(r["_overrides"].get(g, r.get(g))) == str(r.get(g))
                                                 for r in rows if r.get(g) is not None)}


def settled(rows) -> list:
    """rows with each override key that some run names (less NO_RESULT_KEYS and the seed) filled in, for a run that
    does not name it, from the settings it ran with (its `_config`: a command-line run's .hydra/config.yaml, a Python
    run's metrics.json `settings`; a group such as objective by its option's name), so that a setting given at its
    default value (optim.lr=3e-3 where 0.003 is the default) and left out are one configuration. A run whose settings
    do not all hold: a key is filled in for every run that does not name it, or for none (where one such run's
    settings do not say, e.g. an older metrics.json without them, the runs that leave it out stay one as before)."""
    from .jobs import canonical

    def value(r, k):
        config = r.get("_config") or {}
        return config.get(k, config.get(f"{k}.name"))  # objective=iwae: its config's objective.name

    named = {k for r in rows for k in r["_overrides"]} - {"seed", *NO_RESULT_KEYS}
    known = {k for k in named if all(value(r, k) is not None for r in rows if k not in r["_overrides"])}
    return [{**r, "_overrides": {**r["_overrides"], **{k: canonical(value(r, k)) for k in known
                                                        if k not in r["_overrides"]}}} for r in rows]


def _group_keys(rows) -> list:
    """Aggregation keys: model, guide, n and every other override key that varies, except the seed."""
    skip = {"seed", "data.n", "hydra.job.chdir", *NO_RESULT_KEYS} | _named_groups(rows)
    keys = sorted({k for r in rows for k in r["_overrides"] if k not in skip
                   and len({str(q["_overrides"].get(k)) for q in rows}) > 1})
    return ["model", "guide", "n"] + [f"override:{k}" for k in keys]


def fixed_overrides(rows) -> list:
    """The overrides every run of the sweep shares, as sorted 'key=value' strings (no column of the tables)."""
    if not rows:
        return []
    rows = settled(rows)
    keys = set.intersection(*(set(r["_overrides"]) for r in rows)) - set(NO_RESULT_KEYS)
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


def _blank_keys(ok, keys):
    """ok with '' for the unknown values of its key columns (a run whose metrics.json and config name no n, say),
    so that they group together; a numeric column (n: Int64, which takes no '') holding one becomes object."""
    ok = ok.copy()
    for k in keys:
        if ok[k].isna().any():
            ok[k] = ok[k].astype(object).where(ok[k].notna(), "")
    return ok


def _a_number(value) -> bool:
    """Whether value is a number (NaN too: a missing metric), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers_only(jobs, skip) -> None:
    """In place: a metric that some runs hold as a number and others as something else (a string, true or false: a
    hand-edited or foreign metrics.json) is left out of its average for those others only, and their row's error
    says so (summary.md's notes), rather than the metric dropping out of every average silently. (An array or an
    object is flattened into columns of its own by jobs.flatten.)"""
    import pandas as pd

    from .rundir import json_kind

    for col in [c for c in jobs.columns if c not in skip and not c.startswith("override:") and jobs[c].dtype == object]:
        values = jobs[col]
        if not any(_a_number(v) and v == v for v in values):  # a number that is not NaN
            continue  # a text column (an estimator's name, a note)
        odd = [i for i, v in values.items() if v is not None and not _a_number(v)]  # a missing one is NaN
        if odd and "error" not in jobs:
            jobs["error"] = None
        for i in odd:
            said = f"its '{col}' is {json_kind(values[i])}, not a number: left out of that metric's average"
            jobs["error"] = jobs["error"].astype(object)
            jobs.at[i, "error"] = "; ".join(p for p in (jobs.at[i, "error"], said) if isinstance(p, str) and p)
            jobs.at[i, col] = None
        jobs[col] = pd.to_numeric(jobs[col], errors="coerce")


def tables(rows) -> tuple:
    """(jobs, aggregated) DataFrames. jobs: one row per run; duplicate_of names the run a duplicate (same
    configuration and seed) repeats. aggregated: per configuration over its ok runs without duplicates, seeds (the
    number of runs) and <metric>_mean, <metric>_sd, <metric>_count (the runs that have the metric);
    loss_estimator is the runs' one estimator or their tally, estimator the text of the run with the largest
    integration error."""
    import pandas as pd

    rows = settled(rows)
    named = _named_groups(rows)
    jobs = pd.DataFrame([{**{k: v for k, v in r.items() if k not in ("_overrides", "_config")},
                          **{f"override:{k}": v for k, v in r["_overrides"].items()
                             if k not in {"seed", "data.n"} | named}} for r in rows])
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
    _numbers_only(jobs, set(ID_COLUMNS) | set(keys) | {"error"})
    ok = _counted(jobs).infer_objects()  # a column numeric in the counted runs (a failed run's loss "abc" aside)
    numeric = [c for c in ok.columns if c not in ID_COLUMNS and c not in keys
               and pd.api.types.is_numeric_dtype(ok[c]) and not ok[c].isna().all()]
    if ok.empty:
        return jobs, pd.DataFrame(columns=keys + ["seeds"])
    grouped = _blank_keys(ok, keys).groupby(keys, dropna=False, sort=True)
    agg = grouped[numeric].agg(["mean", "std", "count"])
    agg.columns = [f"{m}_{'sd' if s == 'std' else s}" for m, s in agg.columns]
    agg = pd.concat([grouped.size().rename("seeds"), agg], axis=1).reset_index()
    tried = jobs[jobs["duplicate_of"].isna()]
    tried = pd.DataFrame({k: ["" if pd.isna(v) else str(v) for v in tried[k]] for k in keys})
    counts = tried.groupby(keys, dropna=False).size()  # every run of a configuration, failed ones too
    agg["runs"] = [int(counts.get(tuple(str(r[k]) for k in keys) if len(keys) > 1 else str(r[keys[0]]),
                                  r["seeds"])) for _, r in agg.iterrows()]
    if "loss_estimator" in ok:
        agg["loss_estimator"] = [_tally(runs["loss_estimator"]) for _, runs in grouped]
    if "estimator" in ok:
        agg["estimator"] = [_worst_estimator(runs) for _, runs in grouped]
    return jobs, agg


def _metric(agg, base, prefer_exact=True):
    """(column, estimator tag) of a metric in the aggregated table: its exact value (quadrature) when every run of
    every configuration has one; else the headline (metrics.json's top level: each run's most accurate estimate),
    tagged by the runs' loss_estimator, or 'headline' when the configurations' estimators differ (each row then
    names its own, see summary_md._tagged)."""
    col = f"exact.{base}"
    if prefer_exact and f"{col}_count" in agg and (agg[f"{col}_count"] == agg["seeds"]).all():
        return col, "exact"
    tags = sorted({str(t) for t in agg["loss_estimator"]}) if "loss_estimator" in agg else ["MC"]
    return base, tags[0] if len(tags) == 1 else "headline"
