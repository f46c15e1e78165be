"""Figures (PNG, matplotlib's Agg canvas through Figure objects, seaborn styling).

* encoding_figure: per latent, the prior p(z) against the aggregate q(z) (their difference shaded), and each
  q(z|x_k) against the true posterior p(z|x_k) (their difference shaded). Exact densities when the encodings carry
  them, otherwise KDEs of the samples (the true posterior then by Pareto-smoothed importance weighting).

The training curves are analysis.training_figure's, the sweep's encoding grid analysis.sweep_figures'; both draw
with this module's style and palette.
"""
import math
import warnings

import numpy as np

from .encodings import GROUP_EXACT

PRIOR_COLOR = "0.35"
AGG_COLOR = "black"
HOLE_COLOR = "#d62728"    # p(z) mass that q(z) misses
EXCESS_COLOR = "#1f77b4"  # q(z) mass where p(z) has little


def _palette(k):
    import seaborn as sns

    return sns.color_palette("Set2", max(k, 2))


def _new_figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _style():
    import seaborn as sns

    return sns.axes_style("whitegrid")


# ---------------------------------------------------------------------------------------------------------------
# densities of one latent on a grid


def _kde(samples, grid, weights=None):
    from scipy.stats import gaussian_kde

    samples = np.asarray(samples, dtype=float).reshape(-1)
    ok = np.isfinite(samples)
    samples, weights = samples[ok], (None if weights is None else np.asarray(weights)[ok])
    if samples.size < 2 or np.ptp(samples) < 1e-12:  # a point mass: a narrow bump at its location
        centre = samples.mean() if samples.size else 0.0
        width = max(1e-3, 2 * (grid[1] - grid[0]))
        return np.exp(-0.5 * ((grid - centre) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gaussian_kde(samples, weights=weights)(grid)


def _smoothed_weights(log_weight):
    """Self-normalised PSIS weights of one data point's draws, and k-hat."""
    import arviz as az

    lw = np.asarray(log_weight, dtype=float)
    if np.ptp(lw) < 1e-9:
        return np.full(lw.size, 1.0 / lw.size), 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slw, k = az.psislw(lw)
    w = np.exp(slw - slw.max())
    return w / w.sum(), float(k)


def site_densities(idata, site: str, component: int = 0, points: int = 400) -> dict:
    """p(site), the aggregate q(site), q(site|x_k) and p(site|x_k) on a common grid.

    Returns dict(grid, prior, aggregate, q (K, G), posterior (K, G) or None, labels, source, khat). source is
    "exact" when the encodings hold exact densities of the site (for a site of 2 scalars, of its coordinate
    'site[component]': analysis.exact.posterior_grid's marginals), else "kde" (posterior by PSIS-weighted KDE).
    khat is the run's k-hat per data point (the encodings' attrs, evaluate()'s value) or None: the k-hat of the
    figure's own few draws would be another, noisier number than the run's."""
    labels = [str(v) for v in idata.posterior["x"].values]
    w = (np.asarray(idata.constant_data["w"].values, dtype=float) if "constant_data" in idata.groups()
         else np.full(len(labels), 1.0 / len(labels)))
    # exact densities: of a scalar site (component 0), or of a coordinate of a 2-scalar site, named site[component]
    ex = idata[GROUP_EXACT] if GROUP_EXACT in idata.groups() else {}
    key = next((k for k in (f"{site}[{component}]", site if component == 0 else None) if f"{k}_q" in ex), None)
    if key is not None:
        grid = np.asarray(ex[f"{key}_grid"].values, dtype=float)
        q = np.asarray(ex[f"{key}_q"].values, dtype=float)
        agg = (np.asarray(ex[f"{key}_aggregate"].values, dtype=float) if f"{key}_aggregate" in ex
               else (w[:, None] * q).sum(0))
        prior = np.asarray(ex[f"{key}_prior"].values, dtype=float) if f"{key}_prior" in ex else None
        post = np.asarray(ex[f"{key}_posterior"].values, dtype=float) if f"{key}_posterior" in ex else None
        return {"grid": grid, "prior": prior, "aggregate": agg, "q": q, "posterior": post, "labels": labels,
                "source": "exact", "khat": _run_khat(idata),
                "khat_joint": bool(idata.attrs.get("khat_joint"))}

    qs = idata.posterior[site].values[..., component]          # (chain, draw, K)
    qs = qs.reshape(-1, qs.shape[-1])
    ps = idata.prior[site].values[..., component].reshape(-1) if "prior" in idata.groups() else None
    pooled = np.concatenate([qs.reshape(-1)] + ([ps] if ps is not None else []))
    pooled = pooled[np.isfinite(pooled)]
    lo, hi = np.quantile(pooled, [0.002, 0.998])
    pad = 0.15 * max(hi - lo, 1e-3)
    grid = np.linspace(lo - pad, hi + pad, points)
    q = np.stack([_kde(qs[:, k], grid) for k in range(qs.shape[1])])
    prior = _kde(ps, grid) if ps is not None else None
    post = None
    if "sample_stats" in idata.groups() and "log_weight" in idata.sample_stats:
        lw = idata.sample_stats["log_weight"].values.reshape(-1, qs.shape[1])
        post = np.stack([_kde(qs[:, k], grid, weights=_smoothed_weights(lw[:, k])[0]) for k in range(qs.shape[1])])
    return {"grid": grid, "prior": prior, "aggregate": (w[:, None] * q).sum(0), "q": q, "posterior": post,
            "labels": labels, "source": "kde", "khat": _run_khat(idata),
            "khat_joint": bool(idata.attrs.get("khat_joint"))}


def _run_khat(idata):
    """The run's k-hat per data point from the encodings' attrs (None when they carry none)."""
    k = idata.attrs.get("khat")
    return [float(v) for v in k] if k else None


def total_variation(grid, p, q) -> float:
    """(1/2) integral |p - q| on the grid (trapezoid): the shaded area over 2."""
    return 0.5 * float(np.trapezoid(np.abs(np.asarray(p) - np.asarray(q)), grid))


# ---------------------------------------------------------------------------------------------------------------
# drawing


def _draw_marginal(ax, d, site, legend=True):
    """p(z) against the aggregate q(z), shading where q misses p (red) and where q exceeds p (blue)."""
    g, agg, prior = d["grid"], d["aggregate"], d["prior"]
    if prior is not None:
        ax.fill_between(g, 0, prior, color=PRIOR_COLOR, alpha=0.12, lw=0)
        ax.plot(g, prior, color=PRIOR_COLOR, lw=2, label=f"p({site}) prior")
        ax.fill_between(g, agg, prior, where=prior > agg, interpolate=True, color=HOLE_COLOR, alpha=0.45, lw=0,
                        label=f"p({site}) mass q({site}) misses")
        ax.fill_between(g, prior, agg, where=agg > prior, interpolate=True, color=EXCESS_COLOR, alpha=0.3, lw=0,
                        label=f"q({site}) mass beyond p({site})")
    ax.plot(g, agg, color=AGG_COLOR, lw=1.8, label=f"q({site}) aggregate")
    for k, (lab, col) in enumerate(zip(d["labels"], _palette(len(d["labels"])))):
        ax.plot(g, d["q"][k], color=col, lw=1, alpha=0.9, ls=":", label=f"q({site}|{lab})")
    if prior is not None:
        ax.set_title(f"p({site}) vs aggregate q({site}): TV = {total_variation(g, prior, agg):.3f}", fontsize=10)
    if legend:
        ax.legend(fontsize=7, loc="best", frameon=True, framealpha=0.8)


def _draw_conditionals(ax, d, site, legend=True):
    """q(z|x_k) (solid) against the true posterior p(z|x_k) (dashed), the difference shaded in x_k's colour."""
    g, post = d["grid"], d["posterior"]
    tv = []
    for k, (lab, col) in enumerate(zip(d["labels"], _palette(len(d["labels"])))):
        q = d["q"][k]
        ax.plot(g, q, color=col, lw=2, label=f"q({site}|{lab})")
        if post is not None:
            p = post[k]
            ax.fill_between(g, q, p, color=col, alpha=0.3, lw=0)
            name = "p" if d["source"] == "exact" else "~p"
            extra = ((f", joint k-hat {d['khat'][k]:.2f} [PSIS, both points]" if d.get("khat_joint")
                      else f", k-hat {d['khat'][k]:.2f} [PSIS]") if d.get("khat") else "")
            ax.plot(g, p, color=col, lw=1.5, ls="--", dashes=(4, 2),
                    label=f"{name}({site}|{lab}) true{extra}")
            tv.append(total_variation(g, p, q))
    what = "exact" if d["source"] == "exact" else "PSIS-weighted KDE"
    title = f"q({site}|x) vs true p({site}|x) ({what})"
    if tv:
        title += "\nTV: " + ", ".join(f"{t:.3f}" for t in tv)
    ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=7, loc="best", frameon=True, framealpha=0.8)


def _sites(idata):
    sites = idata.attrs.get("latent_sites") or list(idata.posterior.data_vars)
    return [s for s in sites if s in idata.posterior]


def encoding_figure(idata, path=None, title: str = None, max_components: int = 3):
    """The study's encoding figure made exact: a row per latent (top latent first; for the DLGM z2 against p(z2),
    z1 against the learned p(z1)); left p(z) vs the aggregate q(z), right q(z|x_k) vs the true p(z|x_k).

    idata: the output of encodings.encodings() (or encodings.load()). Writes a PNG to `path` if given."""
    rows = []
    for site in _sites(idata):
        dim = idata.posterior[site].shape[-1]
        rows += [(site if dim == 1 else f"{site}[{c}]", site, c) for c in range(min(dim, max_components))]
    with _style():
        fig = _new_figure(11, 3.4 * len(rows))
        axes = np.atleast_2d(fig.subplots(len(rows), 2, squeeze=False))
        sources = set()
        for (label, site, c), (ax_m, ax_c) in zip(rows, axes):
            d = site_densities(idata, site, c)
            sources.add(d["source"])
            _draw_marginal(ax_m, d, label)
            _draw_conditionals(ax_c, d, label)
            for ax in (ax_m, ax_c):
                ax.set_xlabel(label)
                ax.set_ylabel("density")
                ax.set_ylim(bottom=0)
        how = "exact densities (quadrature)" if sources == {"exact"} else (
            "Gaussian KDE of samples; true posterior by PSIS-weighted guide draws" if sources == {"kde"}
            else "exact where available, KDE elsewhere")
        n = idata.attrs.get("n")
        head = title or f"Encodings{f' at n = {n}' if n is not None else ''}"
        fig.suptitle(f"{head}  [{how}]", fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
