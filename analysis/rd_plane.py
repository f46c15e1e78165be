"""The rate-distortion plane: runs as points (R, D) against the exact Gaussian-encoder frontier of the 1-layer VAE
(analysis.frontier) and the line R + D = ln 2, one panel per n."""
import math
import textwrap

import numpy as np

from .frontier import LN2, _check_n, beta_point, distortion_at_rate


def _family(p) -> str:
    return f"{p['model']} + {p['guide']}"


def _label_groups(points, span_r, log_span_d, close=0.015):
    """Points of one family that sit within `close` of the axis spans of each other (D on a log axis) share a
    label."""
    groups = []
    for p in points:
        for g in groups:
            q = g[0]
            if _family(q) == _family(p) and abs(q["rate"] - p["rate"]) <= close * span_r and abs(
                    math.log10(max(q["distortion"], 1e-300)) - math.log10(max(p["distortion"], 1e-300))
            ) <= close * log_span_d:
                g.append(p)
                break
        else:
            groups.append([p])
    return groups


def rd_plane(points, path=None, ns=None, title: str = None):
    """The rate-distortion plane, one panel per n in `ns` (default: the n of the points): the exact
    Gaussian-encoder frontier of the 1-layer VAE at that n, the line R + D = ln 2 (no model of any family goes
    below it; shaded), and each run at that n as a point (R, D), coloured by model + guide and labelled by beta
    (coinciding points of one family share a label, e.g. the collapsed n = 1 runs). D is on a log axis, so
    distances to the frontier show at small D too; points with D <= 0 sit on the axis floor.

    points: list of dicts with keys rate, distortion (nats per data point; give the exact ones when the run has
    them), model, guide, beta, n. Writes a PNG to `path` if given; returns the matplotlib Figure."""
    from matplotlib.lines import Line2D

    from .figures import _new_figure, _palette, _style

    required = ("rate", "distortion", "model", "guide", "beta", "n")
    for i, p in enumerate(points):
        missing = [k for k in required if k not in p]
        if missing:
            raise ValueError(f"points[{i}] lacks {', '.join(missing)} (each point needs {', '.join(required)})")
        for k in ("rate", "distortion", "beta", "n"):
            v = p[k]
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise ValueError(f"points[{i}][{k!r}] must be a finite number, got {v!r}")
    ns = sorted({float(p["n"]) for p in points}) if ns is None else [_check_n(n) for n in ns]
    if not ns:
        raise ValueError("ns is empty and there are no points to take n from")
    families = sorted({_family(p) for p in points})
    colors = dict(zip(families, _palette(len(families))))
    with _style():
        fig = _new_figure(6.0 * len(ns) + 0.5, 5.4)
        axes = np.atleast_1d(fig.subplots(1, len(ns), squeeze=False)[0])
        for ax, n in zip(axes, ns):
            mine = [p for p in points if float(p["n"]) == n]
            far = beta_point(n, 0.1)
            top_rate = max([1.25 * far["rate"], 1.0] + [1.1 * float(p["rate"]) for p in mine])
            R = np.linspace(0.0, top_rate, 161)
            D = distortion_at_rate(n, R)
            positive = [float(p["distortion"]) for p in mine if p["distortion"] > 0]
            floor = max(1e-5, 0.5 * min(positive + [far["distortion"]]))
            top = 1.6 * max([n * LN2] + positive)
            ax.plot(R, np.where(D >= floor, D, np.nan), color="0.25", lw=2, zorder=2,
                    label=f"Gaussian-encoder frontier, n = {n:g} [exact]")
            r_line = np.linspace(0.0, min(top_rate, LN2 - floor), 200)
            ax.fill_between(r_line, floor, LN2 - r_line, color="#d62728", alpha=0.12, lw=0, zorder=1)
            ax.plot(r_line, LN2 - r_line, color="#d62728", lw=1.5, ls="--", zorder=2,
                    label="R + D = ln 2 (below: impossible for any model)")
            for p in mine:
                ax.scatter(p["rate"], max(float(p["distortion"]), floor), s=46, color=colors[_family(p)],
                           edgecolor="black", linewidth=0.6, zorder=4)
            log_span = math.log10(top / floor)
            for g in _label_groups(mine, top_rate, log_span):
                text = "\u03b2=" + ",".join(f"{b:g}" for b in sorted({float(p["beta"]) for p in g}))
                ax.annotate(text, (g[0]["rate"], max(float(g[0]["distortion"]), floor)), xytext=(4, 3),
                            textcoords="offset points", fontsize=7, color="0.15", zorder=5)
            handles, _ = ax.get_legend_handles_labels()
            present = [f for f in families if any(_family(p) == f for p in mine)]
            handles += [Line2D([], [], ls="", marker="o", markersize=7, color=colors[f], markeredgecolor="black",
                               label=f"{f} run (\u03b2 labelled)") for f in present]
            ax.legend(handles=handles, fontsize=7.5, loc="upper right", frameon=True, framealpha=0.9)
            ax.set_yscale("log")
            ax.set_xlim(0.0, top_rate)
            ax.set_ylim(floor, top)
            ax.set_xlabel("rate R = KL(q(z|x) || p(z))  [nats per data point]")
            ax.set_ylabel("distortion D = -E_q log p(x|z)  [nats per data point]")
            ax.set_title(f"n = {n:g}", fontsize=10)
        text = title or "Rate-distortion plane: runs (exact R, D) against the exact Gaussian-encoder frontier"
        width = int(9.5 * fig.get_figwidth())  # characters of an 11-point title across the figure
        fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.split("\n")), fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
