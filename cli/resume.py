"""Resuming a checkpoint: the config keys that decide a training trajectory are saved in every checkpoint, and a
resume that would change them (or shrink train.steps below the checkpoint's step) is refused in one line.
"""
from omegaconf import OmegaConf

from analysis.describe import dotted
from cli.state import ConfigError

# keys that decide a training trajectory: a resume must not change them (train.steps may grow)
TRAJECTORY = ("data", "model", "guide", "objective", "optim", "seed", "train.num_particles", "train.beta",
              "train.warmup", "train.warmup_start", "train.average", "train.freeze_model")
# what a checkpoint written before a key joined TRAJECTORY was trained with (its config lacks the key)
EARLIER = {"train.freeze_model": False}
# keys that decide what history.csv means: a resume must not change them (its rows would mix windows)
HISTORY = ("train.log_every",)


def trajectory_config(cfg) -> dict:
    """The part of the config that decides the training trajectory (saved in every checkpoint)."""
    out = {}
    for key in TRAJECTORY + HISTORY + ("train.steps",):
        value = OmegaConf.select(cfg, key)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def load_resume(cfg):
    """The checkpoint train.resume names, checked against this config: refused in one line if it changes anything
    that decides the trajectory (naming the keys), or if train.steps is below the checkpoint's step."""
    path = OmegaConf.select(cfg, "train.resume")
    if not path:
        return None
    from infer.checkpoint import load_checkpoint

    state = load_checkpoint(path, label="train.resume")
    saved = state.get("config")
    if saved is None:
        written = ("written by fit() in Python, not by run.py: resume it from Python, fit(..., resume=<it>)"
                   if isinstance(state.get("fit"), dict) else "written by an older version")
        raise ConfigError(f"train.resume={path}: the checkpoint carries no config ({written}); it cannot be checked, "
                          "so it is not resumed")
    now, then = dotted(trajectory_config(cfg)), {**EARLIER, **dotted(saved)}
    differ = sorted(k for k in set(now) | set(then) if k != "train.steps" and now.get(k) != then.get(k))
    for group in ("model", "guide", "objective", "optim", "data"):  # another option of a group: name it once
        if f"{group}.name" in differ:
            differ = [f"{group}.name"] + [k for k in differ if not k.startswith(f"{group}.")]
    if differ:
        shown = ", ".join(f"{k} ({then.get(k)!r} -> {now.get(k)!r})" for k in differ[:5])
        raise ConfigError(f"train.resume={path} was written with other settings: {shown}"
                          + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
                          + "; resume with the checkpoint's settings")
    if cfg.train.steps < int(state["step"]):
        raise ConfigError(f"train.steps={cfg.train.steps} is below the checkpoint's step {state['step']}: "
                          f"train.steps must be >= {state['step']} to resume it")
    every = then.get("train.log_every", _log_every_of(state.get("history") or []))
    if every is not None and every != cfg.train.log_every:
        raise ConfigError(f"train.log_every={cfg.train.log_every} differs from the checkpoint's {every}: its history "
                          f"would mix windows of {every} and {cfg.train.log_every} steps; resume with "
                          f"train.log_every={every}")
    return state


def _log_every_of(history: list):
    """The logging window of a history written before checkpoints carried train.log_every: its first row's step,
    when a second row shows that the first window was a full one (None when it cannot be told)."""
    steps = [row.get("step") for row in history[:2]]
    return int(steps[0]) if len(steps) == 2 and None not in steps else None


def resume_note(cfg, state) -> dict:
    """What metrics.json says of a resumed run whose train.steps differs from the step budget its checkpoint was
    written with: {"resumed": {checkpoint, step, checkpoint_steps, schedule_changed}}, since the lr schedule is a
    function of the budget (the steps before ran on the old budget's schedule, those after on the new one's).
    {} otherwise: a resume with the same budget is the uninterrupted run, and its metrics.json is that run's."""
    if state is None:
        return {}
    then = (state.get("config") or {}).get("train.steps")
    if then is None or then == cfg.train.steps:
        return {}
    return {"resumed": {"checkpoint": str(OmegaConf.select(cfg, "train.resume")), "step": int(state["step"]),
                        "checkpoint_steps": then,
                        "schedule_changed": f"steps 1..{state['step']} followed the lr schedule of a {then}-step run, "
                                            f"the rest that of a {cfg.train.steps}-step run (optim.schedule="
                                            f"{cfg.optim.schedule}): not the trajectory of either uninterrupted run"}}
