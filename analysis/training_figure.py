"""training_figure: loss, recon and the rate (KL per site) against the step, in figures.py's style (PNG)."""
import numpy as np

from .figures import HOLE_COLOR, _new_figure, _palette, _style


def _yscale(ax, values, linthresh=1e-2):
    """log y when every value is positive and they span more than a decade; symlog when some are <= 0 and they
    span decades; linear otherwise. Returns the scale used."""
    from matplotlib.ticker import FuncFormatter

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "linear"
    if (v > 0).all() and v.max() / v.min() > 10:
        ax.set_yscale("log")
        fmt = FuncFormatter(lambda y, _: f"{y:g}")
        ax.yaxis.set_major_formatter(fmt)
        return "log"
    if (v <= 0).any() and np.abs(v).max() > 100 * linthresh:
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.axhline(0, color="0.6", lw=0.8)
        return "symlog"
    if (v <= 0).any():
        ax.axhline(0, color="0.6", lw=0.8)
    return "linear"


def training_figure(history, path=None, floor: float = None, optimum: float = None, title: str = None,
                    objective: bool = False, estimator: str = None):
    """Loss, recon and the rate (the KL; for several latent sites also each site's term) against step, under `title`
    (e.g. the run's model, guide, n and seed); with `objective` (the run minimised something other than the -ELBO:
    beta, a warm-up, free bits, the IWAE bound; analysis.run_outputs.trained_on), the objective too, dashed.
    history: FitResult.history (list of dicts) or a DataFrame. Its rows are means over each logging window of the
    per-step training estimates, not evaluations: the loss panel says so, with `estimator` (the training draws' tag,
    e.g. 'RQMC lattice': analysis.montecarlo.KINDS) where it is given.

    floor (e.g. the data entropy ln 2) and optimum (e.g. the Gaussian-family optimum) are drawn on the loss panel.
    A panel's y axis is logarithmic when its curves span more than a decade (symlog when a term is <= 0, as the
    DLGM's KL1 may be), linear otherwise."""
    import pandas as pd

    df = history if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    kls = [c for c in df.columns if c.startswith("rate_") or c.startswith("kl_")]  # kl_: histories before rate_
    with _style():
        fig = _new_figure(13, 3.6)
        ax_l, ax_r, ax_k = fig.subplots(1, 3)
        ax_l.plot(df["step"], df["loss"], color="black", lw=1.5, label="loss")
        curves = [df["loss"].values]
        if objective and "objective" in df:  # beta, a warm-up, free bits, the IWAE bound: not the -ELBO above
            ax_l.plot(df["step"], df["objective"], color="#1f77b4", ls="--", lw=1.2, label="objective (minimised)")
            curves.append(df["objective"].values)
        if floor is not None:
            ax_l.axhline(floor, color="0.5", ls=":", lw=1.2, label=f"entropy floor {floor:.4f}")
        if optimum is not None:
            ax_l.axhline(optimum, color=HOLE_COLOR, ls="--", lw=1.2, label=f"Gaussian optimum {optimum:.4f}")
        _yscale(ax_l, np.concatenate(curves + [[v] for v in (floor, optimum) if v is not None]))
        loss_title = "loss (nats per data point)\nwindow means of the training estimate" + (
            f" [{estimator}]" if estimator else "")
        later = df["loss"].values[max(1, len(df) // 20):]
        refs = [v for v in (floor, optimum) if v is not None]
        if later.size and np.all(np.isfinite(later)) and ax_l.get_yscale() == "linear":
            top, bottom = later.max(), min([later.min()] + refs)
            if df["loss"].max() > top + 2 * (top - bottom):  # the first steps would squash the rest
                ax_l.set_ylim(bottom - 0.1 * (top - bottom), top + 0.25 * (top - bottom))
                loss_title += " (first steps off scale)"
        ax_l.set_title(loss_title, fontsize=10)
        ax_r.plot(df["step"], df["recon"], color="#2ca02c", lw=1.5, label="recon")
        _yscale(ax_r, df["recon"].values)
        ax_r.set_title("recon = -E log p(x|z)", fontsize=10)
        cols = _palette(len(kls))
        sites = [c.split("_", 1)[1] for c in kls]
        if not kls:  # trained without a guide (objective=exact): no rate
            rate_title = "no rate: the model was trained by its exact likelihood"
        elif len(kls) == 1:  # one latent site: its term is the KL
            ax_k.plot(df["step"], df[kls[0]], color=cols[0], lw=1.5, label=f"KL[{sites[0]}] = rate")
            rate_title = f"KL(q({sites[0]}|x) || p({sites[0]}))"
        else:  # several: each term is E[log q(s|.) - log p(s|parents)], only their sum is a KL
            for c, site, col in zip(kls, sites, cols):
                ax_k.plot(df["step"], df[c], color=col, lw=1.2, label=f"rate[{site}]")
            ax_k.plot(df["step"], df[kls].sum(axis=1, skipna=False), color="black", lw=1.5,
                      label="rate = KL(q || p) total")  # a window at beta 0 logs no KL: a gap, not 0
            rate_title = "rate = KL total; rate[s] = E[log q(s|.) - log p(s|parents)]"
        scale = _yscale(ax_k, df[kls].sum(axis=1, skipna=False).values if len(kls) > 1
                        else df[kls].values.reshape(-1)) if kls else "linear"
        if kls and df[kls].isna().all().all():  # infer.result.Window.row: the KL is unknown where beta = 0
            ax_k.text(0.5, 0.5, "no KL logged: every step trained at beta = 0\n"
                      "(the evaluation's KL is in metrics.json)", transform=ax_k.transAxes, ha="center",
                      va="center", fontsize=9)
        ax_k.set_title(rate_title + (" (symlog)" if scale == "symlog" else ""), fontsize=9)
        for ax in (ax_l, ax_r, ax_k):
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        if title:
            fig.suptitle(title, fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
