"""What a run writes into its directory: status.json, metrics.json (headed by `describe` where no config heads it),
history.csv, checkpoint.pt, encodings.nc and the figures. write_run (analysis.report re-exports it) claims the
directory and writes them; write_outputs writes them into a directory its caller claimed (run.py's jobs)."""
import json
import logging
from pathlib import Path

import pandas as pd

from infer.checkpoint import save_checkpoint

from .describe import (OBJECTIVE_NAMES, TRAINED_ON, check_two_phases, describe, evaluation_overrides,
                       model_phase_record, two_phase_history)
from .rundir import write_atomic

log = logging.getLogger("onebit")


def write_run(out: Path, model, guide, data, result, metrics: dict, grids=None, figures: bool = True,
              title: str = None, checkpoint: bool = True, overwrite: bool = False, model_phase=None) -> None:
    """Write a run into the directory out (made if missing): status.json, metrics.json, history.csv, checkpoint.pt
    (unless checkpoint=False), encodings.nc and (figures=True) encodings.png and training.png. result is fit()'s
    return value; grids come from evaluate(). metrics.json gets the model and guide names, n, seed, steps,
    wall_seconds and engine from `describe` where metrics lacks them. The figures' title is `title`, or where it is None
    the command line's for the run (run_title: 'vae + gaussian, n=5, seed=0').

    The directory is claimed as the command line claims a run's (analysis.claim.Claim): a directory that already
    holds a run (its status.json, metrics.json, checkpoint.pt, ...: analysis.rundir.occupant), one whose run is still
    running (live_owner), one inside another run's directory, one that holds runs below it, or the current
    directory while it holds other files, is refused in one line (ValueError) before anything is written.
    overwrite=True replaces the run there whole: its files (analysis.rundir.RUN_FILES: a command-line run's .hydra/
    and figures too) are moved aside first and deleted once the new run is written, or put back if writing fails;
    files that are not a run's are never touched. figures, checkpoint and overwrite must be True or False (a
    ValueError in one line names the one that is not); data, model and guide are checked as evaluate() checks them,
    and metrics must hold evaluate()'s headline 'loss' and no head key (model, guide, n, seed, steps) other than this
    run's (check_metrics).

    model_phase: for a run of two phases as objective=exact's (README, "Training by the exact likelihood"), the fit
    that trained the model by its exact likelihood (infer.marginal.MarginalLikelihood, no guide), `result` being the
    guide's fit to the frozen model (freeze_model=True). The run is then written as `python run.py objective=exact`
    writes one: objective 'exact', its model_phase and guide_phase, the settings keyed against objective=exact's
    defaults, and history.csv with both phases' rows. Anything else is refused in one line."""
    from infer.validate import shown

    from .claim import Claim
    from .rundir import live_owner, occupant, run_path

    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise ValueError(f"out={shown(out)} is not allowed: out must be a directory's path (str or pathlib.Path)")
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics={shown(metrics)} is not allowed: metrics must be the dict evaluate() returns first")
    if not hasattr(result, "history") or not hasattr(result, "steps"):
        raise ValueError(f"result={shown(result)} is not allowed: result must be what fit() returned")
    if grids is not None and not isinstance(grids, dict):
        raise ValueError(f"grids={shown(grids)} is not allowed: grids must be None or the dict evaluate() returns "
                         "second")
    for label, value in (("figures", figures), ("overwrite", overwrite), ("checkpoint", checkpoint)):
        if not isinstance(value, bool):
            raise ValueError(f"{label}={shown(value)} is not allowed: {label} must be True or False")
    from infer.checks import check_inputs

    check_inputs(model, guide, data)  # data, model and guide as evaluate() takes them (data=None: AttributeError)
    out = run_path(out)  # /a/new/../b is /a/b, where no folder 'new' is made
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is not allowed: it is a file; out must be a directory (made if missing)")
    held = occupant(out)
    pid = live_owner(out) if held else None
    if pid is not None:  # replacing it would pull its files from under a run that is still writing them
        raise ValueError(f"out={out} is not allowed: the run there is still running (pid {pid}); wait for it to end, "
                         "or choose another directory")
    if held and not overwrite:
        raise ValueError(f"out={out} is not allowed: it already holds {held}; choose another directory, or pass "
                         "overwrite=True to replace it")
    if model_phase is not None:
        check_two_phases(model, model_phase, result)
    facts = describe(model, guide, data, result, model_phase)  # the head write_outputs would give it
    check_metrics(metrics, facts)
    if model_phase is not None:  # objective=exact's run, whatever evaluate() recorded of its last fit
        metrics = {k: v for k, v in metrics.items() if k != "arguments"}
        metrics.update({k: facts[k] for k in ("objective", "arguments", "model_phase", "guide_phase") if k in facts})
    metrics = {**{k: v for k, v in facts.items() if k not in metrics}, **metrics}
    if isinstance(metrics.get("settings"), dict) and isinstance(metrics.get("evaluation"), dict):
        metrics["settings"] = {**metrics["settings"], **{f"eval.{k}": v for k, v in metrics["evaluation"].items()
                                                         if k != "seed"}}  # what it was evaluated with, as eval.*
    evaluated = evaluation_overrides(metrics.get("evaluation"), metrics.get("seed"))
    if evaluated:  # keyed as the command line's eval.* overrides
        metrics["arguments"] = {**(metrics.get("arguments") or {}), **evaluated}
    metrics = judged(result, data, metrics)
    claim = Claim(out, allow_existing=bool(held), replace=bool(held), key="out")
    try:
        write_outputs(out, model, guide, data, result, metrics, grids, figures=figures, title=title,
                      checkpoint=checkpoint, model_phase=model_phase)
    except BaseException:
        claim.release()
        raise
    status = metrics.get("status") if metrics.get("status") in ("diverged", "failed") else "ok"
    claim.status(status, metrics.get("reason", "") if status != "ok" else "written by analysis.write_run")


# the head keys of evaluate(..., result=r)'s metrics, and where write_run's own head takes each from (describe)
HEAD_SOURCES = {"model": "model", "guide": "guide", "n": "data", "seed": "result", "steps": "result"}


def check_metrics(metrics: dict, facts: dict) -> None:
    """Raise ValueError (one line) unless metrics can be written as this run's: they hold evaluate()'s headline
    'loss' (without it the run was written as diverged, 'the loss became None', blaming lr), and every head key they
    record (model, guide, n, seed, steps) is the run's own, as describe() reads it from model, guide, data and result
    (metrics.json said n=7 for a run at n=3)."""
    from infer.validate import shown

    if "loss" not in metrics:
        raise ValueError(f"metrics={shown(metrics)} is not allowed: metrics must be the dict evaluate() returns first, "
                         "which holds the headline 'loss'; this one lacks it")
    for key, source in HEAD_SOURCES.items():
        if key in metrics and key in facts and metrics[key] != facts[key]:
            raise ValueError(f"metrics['{key}']={shown(metrics[key])} is not allowed: the run written here has "
                             f"{key}={shown(facts[key])} (from its {source}); metrics must be what evaluate() returned "
                             "for this model, guide, data and result")


def judged(result, data, metrics: dict) -> dict:
    """metrics as the command line would write them for this run: where they carry no status and the run counts as
    diverged (infer.result.worse_than_no_latent: the headline, with the run's beta, above the no-latent loss and its
    start, or not finite), status 'diverged' with the reason, and the headline loss moved to loss_judged_diverged
    (a RuntimeWarning says so)."""
    import warnings

    from infer.result import worse_than_no_latent

    if metrics.get("status") is not None:
        return metrics
    plan = getattr(result, "recipe", None) or {}
    objective = plan.get("objective")
    reason = worse_than_no_latent(result, data, plan.get("beta", 1.0), final=metrics,
                                  objective=OBJECTIVE_NAMES.get(objective, objective))
    if not reason:
        return metrics
    reason += "; lower lr"
    warnings.warn(f"the run is written as diverged: {reason}", RuntimeWarning, stacklevel=3)
    return {**metrics, "status": "diverged", "reason": reason, "loss": None,
            "loss_judged_diverged": metrics.get("loss")}


def training_estimator(result) -> str:
    """The tag of the draws a run trained with ('RQMC lattice', 'RQMC', 'MC': analysis.montecarlo.KINDS, by its
    recipe's noise), or None where its recipe names none (a Pyro ELBO of the user's: its own draws)."""
    from .montecarlo import KINDS

    return KINDS.get((getattr(result, "recipe", None) or {}).get("noise"))


def run_title(metrics: dict) -> str:
    """The figures' title of a run, from its metrics.json head: 'vae + gaussian, n=5, seed=0' (the parts it records;
    None where it records none), the same for a command-line run and one written from Python."""
    who = " + ".join(str(metrics[k]) for k in ("model", "guide") if metrics.get(k) is not None)
    facts = ", ".join(f"{k}={metrics[k]}" for k in ("n", "seed") if metrics.get(k) is not None)
    return ", ".join(p for p in (who, facts) if p) or None


def write_outputs(out: Path, model, guide, data, result, metrics: dict, grids=None, figures: bool = True,
                  title: str = None, checkpoint: bool = True, model_phase=None, from_config: bool = False) -> dict:
    """Write a run's outputs (write_run's files but status.json) into out, a directory its caller has claimed (the
    command line's job, or write_run): nothing here checks what the directory holds. Each file is written whole or
    not at all (through a temporary file: a full disk is one OSError naming it). Returns the metrics as written to
    metrics.json (metrics, and what describe() adds; from_config: a command line's run, whose overrides are in
    .hydra/, gets no `arguments`). model_phase (objective=exact's first fit): history.csv holds both phases' rows,
    and checkpoint.pt, the guide phase's, keeps the model phase's record (model_phase_record), as run.py's does."""
    from . import encodings as enc
    from .figures import encoding_figure
    from .training_figure import training_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head = describe(model, guide, data, result)
    if from_config:  # its overrides and settings are in .hydra/
        head.pop("arguments", None)
        head.pop("settings", None)
    metrics = {**{k: v for k, v in head.items() if k not in metrics}, **metrics}
    title = run_title(metrics) if title is None else title
    history = result.history if model_phase is None else two_phase_history(model_phase, result)
    write_atomic(out / "history.csv", pd.DataFrame(history).to_csv(index=False))
    if checkpoint:
        save_checkpoint(out / "checkpoint.pt", result,
                        extra={**{k: metrics[k] for k in ("model", "guide") if k in metrics},
                               **({"model_phase": model_phase_record(model_phase)} if model_phase is not None else {})})
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    idata = enc.encodings(model, guide, data, grids=grids, khat=metrics.get("psis"))
    enc.save(idata, out / "encodings.nc")
    log.debug("ArviZ summary of the encodings (guide samples per data point):\n%s", enc.summary_text(idata))
    if figures:
        encoding_figure(idata, out / "encodings.png", title=title)
        minimised = any(k in metrics for k in TRAINED_ON)  # the run minimised something other than the -ELBO
        training_figure(history, out / "training.png", floor=data.entropy, optimum=metrics.get("gaussian_optimum"),
                        title=title, objective=minimised, estimator=training_estimator(result))
    return metrics
