"""Summaries of a Hydra sweep directory: summary.csv, summary.md and the sweep figures.

    python -m analysis.sweep multirun/2026-01-01/12-00-00

A job directory is any directory below the sweep directory that holds .hydra/ or metrics.json; one without
metrics.json is a failed job. When the sweep's multirun.yaml is present, jobs of the sweep that have no directory
at all are listed as missing.

Outputs, in the sweep directory:
* summary.csv: one row per job: status, its overrides, the config summary and every metric (nested blocks
  flattened with dots: kl.z, exact.loss, khat.x0, ...);
* summary_by_config.csv: seeds aggregated (mean, sd, count) per (model, guide, n, other overrides);
* summary.md: the aggregated table (mean ± sd over seeds), the per-job table, and the failed/missing jobs;
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
ID_COLUMNS = ("job", "status", "model", "guide", "n", "seed", "beta", "overrides")
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


def job_dirs(sweep_dir: Path) -> list:
    """Every job directory below sweep_dir (holding .hydra/ or metrics.json), sorted. A job that trained replicas
    (status.json lists them) is not a row itself: each replica's directory is, one seed each."""
    from .rundir import read_status

    found = {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir() and p.parent != sweep_dir}
    return sorted(job for job in found if not read_status(job).get("replicas"))


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


def collect(sweep_dir) -> tuple:
    """(rows, missing): one row per job directory; missing = override strings of jobs without a directory."""
    sweep_dir = Path(sweep_dir)
    rows = [read_job(j, sweep_dir) for j in job_dirs(sweep_dir)]
    have = [_norm(o.split()) for o in (r["overrides"] for r in rows)]
    missing = []
    for overrides in expected_jobs(sweep_dir):
        want = _norm(overrides)
        if not any(want <= h for h in have):
            missing.append(" ".join(overrides))
    return rows, missing


# ---------------------------------------------------------------------------------------------------------------
# tables


def _group_keys(rows) -> list:
    """Aggregation keys: model, guide, n and every other override key that varies, except the seed."""
    skip = {"seed", "model", "guide", "data.n", "hydra.job.chdir"}
    keys = sorted({k for r in rows for k in r["_overrides"] if k not in skip
                   and len({str(q["_overrides"].get(k)) for q in rows}) > 1})
    return ["model", "guide", "n"] + [f"override:{k}" for k in keys]


def tables(rows) -> tuple:
    """(jobs, aggregated) DataFrames. aggregated has <metric>_mean, <metric>_sd, seeds per configuration."""
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
    ok = jobs[jobs["status"] == "ok"]
    keys = [k for k in _group_keys(rows) if k in jobs]
    numeric = [c for c in ok.columns if c not in ID_COLUMNS and c not in keys
               and pd.api.types.is_numeric_dtype(ok[c]) and not ok[c].isna().all()]
    if ok.empty:
        return jobs, pd.DataFrame(columns=keys + ["seeds"])
    grouped = ok.fillna({k: "" for k in keys}).groupby(keys, dropna=False, sort=True)
    agg = grouped[numeric].agg(["mean", "std"])
    agg.columns = [f"{m}_{'sd' if s == 'std' else s}" for m, s in agg.columns]
    agg.insert(0, "seeds", grouped.size())
    agg = agg.reset_index()
    for col in ("estimator", "loss_estimator"):  # text columns: the first run's, per configuration
        if col in ok:
            agg[col] = grouped[col].first().reset_index(drop=True)
    return jobs, agg


def _pm(mean, sd, digits=4, sci=False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    f = (lambda v: f"{v:.{digits - 1}e}") if sci else (lambda v: f"{v:.{digits}f}")
    if sd is None or (isinstance(sd, float) and math.isnan(sd)):
        return f(mean)
    return f"{f(mean)} ± {f(sd)}"


def _md_table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _metric(df, base, prefer_exact=True):
    """(column, estimator tag) of a metric: the exact value when every run carries one, else the headline column
    (metrics.json's top level, labelled by its loss_estimator: exact where quadrature ran, Monte Carlo elsewhere)."""
    if prefer_exact and f"exact.{base}_mean" in df and df[f"exact.{base}_mean"].notna().all():
        return f"exact.{base}", "exact"
    tags = sorted({str(t) for t in df.get("loss_estimator", [])} - {"nan", "None"}) or ["MC"]
    return base, "/".join(tags) + " (per run: loss_estimator)" if len(tags) > 1 else tags[0]


def markdown(jobs, agg, missing, sweep_dir) -> str:
    """summary.md: aggregated table, per-job table, failed and missing jobs."""
    failed = jobs[jobs["status"] != "ok"]
    parts = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(jobs)} job directories: {int((jobs['status'] == 'ok').sum())} ok, {len(failed)} not ok "
             f"({', '.join(f'{v} {k}' for k, v in failed['status'].value_counts().items()) or 'none'}); "
             f"{len(missing)} missing. Units: nats per data point. Seeds aggregated as mean ± sd.", ""]
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
                  + ([] if loss_est == "exact" else ["loss SE [MC]"]) + [f"recon/dim [{rec_est}]"]
                  + ([f"rate (= KL) [{loss_est.split(' ')[0]}]"] if f"{rate_col}_mean" in agg else [])
                  + [f"rate[{s}]" for s in sites] + extra)
        body = []
        for _, r in agg.iterrows():
            row = [r["model"], r["guide"], r["n"]] + [r[c] for c in okeys] + [int(r["seeds"])]
            row.append(_pm(r.get(f"{loss_col}_mean"), r.get(f"{loss_col}_sd")))
            if loss_est != "exact":
                row.append(_pm(r.get("loss_se_mean"), None))
            row.append(_pm(r.get(f"{rec_col}_mean"), r.get(f"{rec_col}_sd"), digits=3, sci=True))
            if f"{rate_col}_mean" in agg:
                row.append(_pm(r.get(f"{rate_col}_mean"), r.get(f"{rate_col}_sd")))
            row += [_pm(r.get(f"kl.{s}_mean"), r.get(f"kl.{s}_sd")) for s in sites]
            row += [_pm(r.get(f"{c}_mean"), r.get(f"{c}_sd")) for c in extra]
            body.append(row)
        parts += ["## By configuration", "", _md_table(header, body), ""]
        if sites:
            parts += ["rate[s] = E_q[log q(s|.) - log p(s|parents)]: a latent site's term of the rate, not a KL (it can "
                      "be negative); only their sum, the rate, is the KL of q to the model's prior.", ""]
        if "estimator" in agg:
            parts += ["Estimators: " + "; ".join(sorted({str(e) for e in agg["estimator"].dropna()}))
                      + (". [exact] columns come from quadrature (metrics.json 'exact' block)."
                         if loss_est == "exact" else ""), ""]
    ok = jobs[jobs["status"] == "ok"]
    if not ok.empty:
        cols = [c for c in ("job", "model", "guide", "n", "seed", "loss", "loss_se", "recon_per_dim", "exact.loss",
                            "khat.max", "steps", "wall_seconds") if c in ok]
        body = [[("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                  (f"{v:.4g}" if isinstance(v, float) else v)) for v in r] for r in ok[cols].itertuples(index=False)]
        parts += ["## Jobs", "", _md_table(cols, body), ""]
    parts += ["## Failed and missing jobs", ""]
    if failed.empty and not missing:
        parts.append("None.")
    for _, r in failed.iterrows():
        parts.append(f"- {str(r['status']).upper()} `{r['job']}` ({r['overrides'] or 'no overrides'}): "
                     f"{r.get('error') or 'no reason recorded'}")
    for m in missing:
        parts.append(f"- MISSING {m} (no job directory)")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# figures


def _optimum_curve(ns):
    from .optimum import gaussian_optimum

    lo, hi = max(min(ns), 1.0), max(ns)
    grid = np.unique(np.concatenate([np.geomspace(lo, hi, 12), np.asarray(ns, dtype=float)]))
    opt = [gaussian_optimum(float(n)) for n in grid]
    return grid, np.array([o["loss"] for o in opt]), np.array([o["recon_per_dim"] for o in opt])


def _per_model(agg, col):
    for model, df in agg.groupby("model", sort=False):
        df = df.sort_values("n")
        if f"{col}_mean" in df:
            yield model, df


def sweep_figures(agg, jobs, out: Path, reference: bool = True) -> list:
    """loss_vs_n.png and recon_per_dim_vs_n.png; returns the paths written."""
    import seaborn as sns
    from matplotlib.figure import Figure

    written = []
    if agg.empty:
        return written
    ns = sorted(float(n) for n in agg["n"].dropna().unique())
    opt_n, opt_loss, opt_rec = _optimum_curve(ns)
    palette = dict(zip(sorted(agg["model"].dropna().unique(), key=lambda m: (m != "vae", m)),
                       sns.color_palette("deep")))
    ok = jobs[jobs["status"] == "ok"]
    for base, name, ylog in (("loss", "loss_vs_n.png", False), ("recon_per_dim", "recon_per_dim_vs_n.png", True)):
        col, est = _metric(agg, base)
        with sns.axes_style("whitegrid"):
            fig = Figure(figsize=(6.5, 4.5), layout="constrained")
            ax = fig.subplots()
            for model, df in _per_model(agg, col):
                color = palette.get(model)
                label = f"{model} ({', '.join(sorted(df['guide'].astype(str).unique()))} guide) [{est}]"
                if df["n"].duplicated().any():  # several configurations per n (other overrides, optuna trials):
                    ax.scatter(df["n"].astype(float), df[f"{col}_mean"], color=color, s=18,  # points, not a curve
                               label=f"{label}, {len(df)} configurations")
                    continue
                sd = df[f"{col}_sd"].fillna(0) if f"{col}_sd" in df else None
                ax.errorbar(df["n"].astype(float), df[f"{col}_mean"], yerr=sd, color=color, marker="o", ms=5,
                            capsize=3, lw=1.5, label=label)
                seeds = ok[ok["model"] == model]
                if col in seeds:
                    ax.scatter(seeds["n"].astype(float), seeds[col], color=color, s=10, alpha=0.35, lw=0)
            if base == "loss":
                ax.axhline(LN2, color="0.4", ls=":", lw=1.3, label="entropy ln 2 (floor of every loss)")
            if "vae" in palette:  # the optimum bounds the 1-layer vae only; a marker where one n is swept
                ax.plot(opt_n, opt_loss if base == "loss" else opt_rec, color="#d62728", ls="--", lw=1.3,
                        marker="_" if len(set(opt_n)) == 1 else None, ms=14,
                        label="Gaussian-encoder optimum of the 1-layer VAE")
            if reference:
                for model, table in ORIGINAL.items():
                    if model in palette:
                        xs = sorted(table)
                        ys = [table[n][0 if base == "loss" else 1] for n in xs]
                        ax.scatter(xs, ys, marker="x", s=30, color=palette[model], alpha=0.8,
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
    """encodings_grid.png from each (model, n)'s lowest-seed job with an encodings.nc; None if there is none."""
    from .encodings import load
    from .figures import encoding_grid

    if "encodings" not in jobs:
        return None
    ok = jobs[(jobs["status"] == "ok") & jobs["encodings"].notna()].sort_values("seed")
    if ok.empty:
        return None
    cells = {}
    for (model, n), df in ok.groupby(["model", "n"]):
        try:
            cells[(model, int(n))] = load(df.iloc[0]["encodings"])
        except Exception as err:
            log.warning("could not read %s: %s", df.iloc[0]["encodings"], err)
            cells[(model, int(n))] = None
    models = {m for m, _ in cells} | set(jobs["model"].dropna())
    ns = {n for _, n in cells} | {int(n) for n in jobs["n"].dropna()}
    for key in itertools.product(models, ns):
        cells.setdefault(key, None)
    encoding_grid(cells, out / "encodings_grid.png",
                  title="Top latent per model (rows) and n (columns), lowest seed: p(z) grey, q(z) black, "
                        "mass q(z) misses red, q(z|x_k) solid, true p(z|x_k) dashed")
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

    ok = jobs[jobs["status"] == "ok"] if "status" in jobs else jobs
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
    """Read every job of a sweep and write summary.csv, summary_by_config.csv, summary.md and the sweep figures.

    Returns dict(jobs=DataFrame, aggregated=DataFrame, failed=[job dirs], missing=[override strings],
    files=[paths written])."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    rows, missing = collect(sweep_dir)
    jobs, agg = tables(rows)
    files = [sweep_dir / "summary.csv", sweep_dir / "summary_by_config.csv", sweep_dir / "summary.md"]
    jobs.to_csv(files[0], index=False)
    agg.to_csv(files[1], index=False)
    files[2].write_text(markdown(jobs, agg, missing, sweep_dir))
    if figures:
        for step in (lambda: sweep_figures(agg, jobs, sweep_dir), lambda: [encodings_figure(jobs, sweep_dir)],
                     lambda: [rate_distortion_figure(jobs, sweep_dir)]):
            try:
                files += [p for p in step() if p is not None]
            except Exception as err:  # a broken figure must not hide the tables
                log.warning("sweep figure failed: %s: %s", type(err).__name__, err)
    failed = list(jobs.loc[jobs["status"] != "ok", "job"])
    return {"jobs": jobs, "aggregated": agg, "failed": failed, "missing": missing, "files": files}


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
