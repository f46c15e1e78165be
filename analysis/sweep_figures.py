"""The sweep figures: loss_vs_n.png and recon_per_dim_vs_n.png (a curve per configuration, mean ± sd over seeds,
with the Gaussian-encoder optimum and the original study's numbers), encodings_grid.png (encoding_grid) and
rate_distortion.png."""
import itertools
import logging
import math
from pathlib import Path

import numpy as np

from .aggregate import _counted, _metric

log = logging.getLogger("onebit.sweep")
LN2 = math.log(2.0)
# The original study's numbers (RuiShu/one-bit-vae; Monte Carlo, one draw per row), see seed/REFERENCE.md
ORIGINAL = {"vae": {1: (0.69315, 0.69254), 5: (1.06633, 2.788e-2), 10: (1.14074, 9.561e-3),
                    100: (1.42624, 1.476e-3), 1000: (1.48595, 4.282e-5)},
            "dlgm": {1: (0.69319, 0.69304), 5: (0.72147, 1.955e-3), 10: (0.72381, 9.198e-5),
                     100: (0.72214, 2.292e-5), 1000: (0.75055, 2.227e-6)}}


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
    floors, equal = _floors(_counted(jobs))
    models = set(agg["model"].dropna()) if equal is None else equal  # the optimum and the study: equal weights
    weighted = set(floors) != {None}
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
                tag = est  # where the configurations' estimators differ ('headline'), each curve names its own
                if est == "headline" and "loss_estimator" in df:
                    tag = " / ".join(sorted({str(t) for t in df["loss_estimator"]}))
                ax.errorbar(df["n"].astype(float), df[f"{col}_mean"], yerr=sd, color=color, marker="o", ms=5,
                            capsize=3, lw=1.5, label=f"{label} [{tag}]")
                seeds = _runs(jobs, key)
                if col in seeds:
                    ax.scatter(seeds["n"].astype(float), seeds[col], color=color, s=10, alpha=0.35, lw=0)
            if base == "loss":
                for (floor, w), ls in zip(sorted(floors.items(), key=lambda f: -(f[0] or LN2)),
                                         itertools.cycle((":", "-.", "--"))):
                    label = ("entropy ln 2 (floor of every loss)" if not weighted else "entropy ln 2 (floor of the "
                             "equal weights' losses)" if floor is None else f"entropy H(w) = {floor:.4f} (floor of "
                             f"the losses with w = {w})")
                    ax.axhline(LN2 if floor is None else floor, color="0.4", ls=ls, lw=1.3, label=label)
            equally = " (equal weights)" if weighted else ""
            if "vae" in models:  # the optimum bounds the 1-layer vae only; a marker where one n is swept
                ax.plot(opt_n, opt_loss if base == "loss" else opt_rec, color="#d62728", ls="--", lw=1.3,
                        marker="_" if len(set(opt_n)) == 1 else None, ms=14,
                        label="Gaussian-encoder optimum of the 1-layer VAE" + equally)
            if reference:
                for model, table in ORIGINAL.items():
                    if model in models:
                        xs = sorted(table)
                        ys = [table[n][0 if base == "loss" else 1] for n in xs]
                        ax.scatter(xs, ys, marker="x" if model == "vae" else "+", s=30, alpha=0.8,
                                   color=model_color.get(model, "0.3"),
                                   label=f"{model}: original study (MC)" + equally)
            ax.set_xscale("log")
            values = agg[f"{col}_mean"].dropna()
            if ylog or (len(values) and values.min() > 0 and values.max() / values.min() > 5):
                from matplotlib.ticker import FuncFormatter

                ax.set_yscale("log")
                if not ylog:
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
                    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if str(y)[0] in "2357" else ""))
            ax.set_xlabel("n (bits per data point)")
            ax.set_ylabel(("loss (nats per data point" + (", w-weighted)" if weighted else ")"))
                          if base == "loss" else "recon / n (nats per bit)")
            ax.set_title(("Loss" if base == "loss" else "Reconstruction per dimension")
                         + " against n (mean ± sd over seeds; dots: seeds)", fontsize=10)
            ax.legend(fontsize=7)
        fig.savefig(out / name, dpi=110)
        written.append(out / name)
    return written


def _floors(ok) -> tuple:
    """({floor: weights} of the runs: H(w) and 'w0/w1' for each distinct unequal weighting (metrics.json's
    entropy_floor and weights), None: None for the runs on equal weights, whose floor is ln 2), and the models of
    the runs on equal weights where some run has unequal ones (else None): the Gaussian-encoder optimum and the
    original study's numbers are for equal weights."""
    cols = sorted(c for c in ok if c.startswith("weights.x"))
    if "entropy_floor" not in ok or ok.empty:
        return {None: None}, None
    floors = {}
    for _, r in ok.iterrows():
        floor = r.get("entropy_floor")
        if isinstance(floor, (int, float)) and not math.isnan(floor):
            floors.setdefault(float(floor), "/".join(f"{r[c]:g}" for c in cols if isinstance(r[c], (int, float))
                                                     and not math.isnan(r[c])))
        else:
            floors[None] = None
    equal = ok[ok["entropy_floor"].isna()]
    return floors, set(equal["model"].dropna())


def encodings_figure(jobs, out: Path):
    """encodings_grid.png: a row per model, guide and varying override (as the curves of sweep_figures), a column
    per n, each cell from the lowest-seed run with an encodings.nc; None if there is none."""
    from .encodings import load

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


def _last_kl_weight(row) -> float:
    """The KL weight of a run's last step, its point's beta on the plane (analysis.describe.final_kl_weight of the
    row's kl_weight_final and beta, where they are not missing)."""
    from .describe import final_kl_weight

    return final_kl_weight({k: row.get(k) for k in ("kl_weight_final", "beta")
                            if row.get(k) is not None and not (isinstance(row.get(k), float) and math.isnan(row[k]))})


def rate_distortion_figure(jobs, out: Path):
    """rate_distortion.png (analysis.rd_plane) when the ok runs span more than one beta or more than one
    model/guide family; None otherwise."""
    from .rd_plane import rd_plane

    ok = _counted(jobs)
    unequal = ok["entropy_floor"].notna() if "entropy_floor" in ok else None
    if unequal is not None and unequal.any():  # the frontier and the line R + D = ln 2 are the equal weights'
        log.info(f"rate_distortion.png leaves out {int(unequal.sum())} run(s) on unequal data weights: its frontier "
                 "and its bound R + D = ln 2 are for equal weights (theirs is H(w))")
        ok = ok[~unequal]
    if ok.empty:
        return None
    points = []
    for _, r in ok.iterrows():
        rate, dist = _rd_value(r, "rate"), _rd_value(r, "distortion")
        if rate is None or dist is None:
            continue
        points.append({"rate": rate, "distortion": dist, "model": r["model"], "guide": r["guide"],
                       "beta": _last_kl_weight(r), "n": int(r["n"])})
    if len({p["beta"] for p in points}) < 2 and len({(p["model"], p["guide"]) for p in points}) < 2:
        return None  # one KL weight (at the last step: a warm-up's counts) and one family: nothing to compare
    left = "" if unequal is None or not unequal.any() else (
        f"\n({int(unequal.sum())} run(s) on unequal data weights left out: frontier and ln 2 are for equal weights)")
    rd_plane(points, out / "rate_distortion.png", ns=sorted({p["n"] for p in points}),
             title=None if not left else "Rate-distortion plane: runs (exact R, D) against the exact Gaussian-encoder "
                                         "frontier" + left)
    return out / "rate_distortion.png"


def encoding_grid(cells: dict, path=None, title: str = None):
    """The sweep's encoding grid: cells maps (model, n) -> encodings InferenceData (None for a missing job).

    Each panel shows the top latent: p(z) shaded grey, aggregate q(z) black, the mass q(z) misses red, q(z|x_k)
    coloured and the true p(z|x_k) dashed."""
    from .encodings import top_site  # not at import: it brings torch, which a sweep's summary may not need
    from .figures import (AGG_COLOR, HOLE_COLOR, PRIOR_COLOR, _new_figure, _palette, _style, site_densities,
                          total_variation)

    models = sorted({m for m, _ in cells}, key=lambda m: (not str(m).startswith("vae"), m))
    ns = sorted({n for _, n in cells})
    with _style():
        # at least ~8.5 in wide so the title and a legend of up to 7 entries fit with 1-2 columns
        columns = 4 if len(ns) < 3 else 7
        fig = _new_figure(max(2.9 * len(ns) + 0.6, 8.5), 2.6 * len(models) + 0.8 + (0.4 if len(ns) < 3 else 0))
        axes = np.atleast_2d(fig.subplots(len(models), len(ns), squeeze=False))
        for i, m in enumerate(models):
            for j, n in enumerate(ns):
                ax, idata = axes[i, j], cells.get((m, n))
                if idata is None:
                    ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes, color="0.5")
                    ax.set_xticks([])
                    ax.set_yticks([])
                else:
                    site = top_site(idata)
                    d = site_densities(idata, site)
                    g = d["grid"]
                    if d["prior"] is not None:
                        ax.fill_between(g, 0, d["prior"], color=PRIOR_COLOR, alpha=0.15, lw=0)
                        ax.plot(g, d["prior"], color=PRIOR_COLOR, lw=1.5, label=f"p({site})")
                        ax.fill_between(g, d["aggregate"], d["prior"], where=d["prior"] > d["aggregate"],
                                        interpolate=True, color=HOLE_COLOR, alpha=0.45, lw=0,
                                        label=f"p({site}) mass q misses")
                    ax.plot(g, d["aggregate"], color=AGG_COLOR, lw=1.5, label=f"q({site})")
                    for k, col in enumerate(_palette(len(d["labels"]))):
                        ax.plot(g, d["q"][k], color=col, lw=1, label=f"q({site}|x{k})")
                        if d["posterior"] is not None:
                            ax.plot(g, d["posterior"][k], color=col, lw=1, ls="--", dashes=(3, 2),
                                    label=f"p({site}|x{k})")
                    ax.set_ylim(bottom=0)
                    tv = total_variation(g, d["prior"], d["aggregate"]) if d["prior"] is not None else float("nan")
                    ax.text(0.02, 0.97, f"{site}  TV(q,p)={tv:.2f}\n[{d['source']}]", transform=ax.transAxes,
                            fontsize=7, va="top")
                if i == 0:
                    ax.set_title(f"n = {n}", fontsize=10)
                if j == 0:
                    ax.set_ylabel(m, fontsize=11)
        handles, labels = [], []
        for ax in axes.flat:
            h, lab = ax.get_legend_handles_labels()
            for hh, ll in zip(h, lab):
                key = ll.replace("z2", "z").replace("z1", "z")
                if key not in labels:
                    handles.append(hh)
                    labels.append(key)
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), columns), fontsize=8)
        text = title or "Encodings of the top latent: p(z) vs aggregate q(z), q(z|x_k) vs p(z|x_k)"
        if len(ns) < 3:  # a narrow grid: break the title into lines of ~70 characters
            import textwrap

            text = "\n".join(textwrap.wrap(text, 70))
        fig.suptitle(text, fontsize=10 if len(ns) < 3 else 11)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
