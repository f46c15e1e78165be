"""The preflight: a command line checked before Hydra creates anything (its flags, keys and values), a single
run's directory claimed and a multirun's sweep directory claimed, so that a refused run leaves no trace.
"""
import os
from pathlib import Path

from omegaconf import OmegaConf

from cli.keys import check_group_choices, check_keys, compose_config, composition_error, parse_overrides
from cli.resume import load_resume
from cli.rundirs import claim_for, failed_value
from cli.state import STATE, ConfigError
from cli.sweep import check_job_dirs, check_seed_overlap, check_some_job_runs, claim_sweep, sweep_jobs
from cli.values import resolved, validate

# Hydra's own flags that print or change how Hydra runs; with these the preflight is skipped
HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--package", "-p",
               "--shell-completion", "-sc", "--version", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun")
RUN_FLAGS = ("-m", "--multirun", "-r", "--run")
# --config-dir adds a directory of config groups: the preflight runs with it (cli.keys.EXTRA_DIRS)
PRINT_FLAGS = tuple(f for f in HYDRA_FLAGS if f not in ("--config-dir", "-cd"))
FLAG_VALUES = {"--cfg": ("job", "hydra", "all"), "-c": ("job", "hydra", "all"),
               "--info": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath"),
               "-i": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")}
VALUE_FLAGS = ("--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
               "--experimental-rerun", "--shell-completion", "-sc")


def _flag_value(args, i: int, missing: str = "") -> str:
    """The value of the flag args[i]: after its '=' (--cfg=job), else the next argument, else `missing`."""
    value = args[i].partition("=")[2]
    return value or (args[i + 1] if i + 1 < len(args) else missing)


def check_flags(args) -> None:
    """Refuse, in one line, a dash argument that is neither -m/--multirun nor one of Hydra's flags (argparse would
    print its usage and exit after the run dir was claimed), and --cfg without job, hydra or all."""
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        flag = arg.partition("=")[0]
        if flag not in RUN_FLAGS + HYDRA_FLAGS:
            raise ConfigError(f"{arg} is not an option of run.py: its options are -m/--multirun and Hydra's own "
                              "(--help, --cfg job, --info, ...); settings are key=value overrides (e.g. data.n=5)")
        if flag in ("--cfg", "-c"):
            value = _flag_value(args, i)
            if value not in FLAG_VALUES[flag]:
                raise ConfigError(f"{flag} {value}: {flag} must be followed by job, hydra or all")
        if flag in CONFIG_FLAGS:
            _check_config_flag(flag, _flag_value(args, i))
        if flag == "--experimental-rerun":
            path = _flag_value(args, i)
            missing = "" if os.path.isfile(path) else " (no such file)"  # Hydra warned over two lines first
            raise ConfigError(f"{flag} {path} is not allowed{missing}: run.py's runs write no config.pickle (their "
                              ".hydra/ holds config.yaml and overrides.yaml), and a rerun would unpickle the file "
                              "(code of any kind: a file not a pickle was a traceback) and run without the checks of "
                              "its values or the claim of its run dir; rerun a run from its overrides instead: python "
                              "run.py <the lines of its .hydra/overrides.yaml> hydra.run.dir=<a new dir>")
        if flag in ("--shell-completion", "-sc"):
            _check_completion(arg, args[i + 1] if i + 1 < len(args) else "")
    check_order(args)


COMPLETION = ("install", "uninstall", "query")
SHELLS = ("bash", "fish", "zsh")


def _check_completion(arg: str, following: str) -> None:
    """Refuse, in one line, --shell-completion (-sc) without its subcommand, <install|uninstall|query>=<shell>, as
    the next argument: Hydra printed a traceback (no subcommand, or a shell it has no plugin for) and exited 1, and
    argparse its usage for --shell-completion=install=bash."""
    command, eq, shell = following.partition("=")
    if "=" in arg or not eq or command not in COMPLETION or shell not in SHELLS:
        flag = arg.partition("=")[0]
        raise ConfigError(f"{arg} {following}".strip() + f" is not allowed: {flag} must be followed by one of "
                          f"{', '.join(f'{c}=<shell>' for c in COMPLETION)}, the shell one of {', '.join(SHELLS)} "
                          f"(e.g. python run.py {flag} install=bash)")


def check_package(args, overrides) -> None:
    """Refuse, in one line, --package naming no node of the composed config (Hydra: exit 1)."""
    for i, arg in enumerate(args):
        flag = arg.partition("=")[0]
        if flag in ("--package", "-p"):
            package = _flag_value(args, i)
            cfg = compose_config(overrides, hydra_cfg=True)
            if package != "_global_" and OmegaConf.select(cfg, package, default=None) is None:
                tops = ", ".join(k for k in cfg if k != "hydra")
                raise ConfigError(f"{flag} {package}: no such node in the config; {flag} takes a key of it, e.g. one "
                                  f"of {tops}, hydra")


def check_info_value(args) -> None:
    """Refuse, in one line, --info followed by an override (argparse would take it as --info's value and print its
    usage). Checked after the overrides' keys and values, so that a bad one is named first."""
    for i, arg in enumerate(args):
        flag = arg.partition("=")[0]
        following = _flag_value(args, i, missing="-")
        if flag in ("--info", "-i") and not following.startswith("-") and following not in FLAG_VALUES[flag]:
            raise ConfigError(f"{flag} {following}: {flag} takes one of {', '.join(FLAG_VALUES[flag])}, or nothing, "
                              f"before the overrides (e.g. python run.py {flag} config {following})")


CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


def _check_config_flag(flag, value) -> None:
    """Refuse, in one line, a primary config other than conf/config.yaml (run.py's task reads its keys) and a
    --config-dir that is not a directory (Hydra printed its search path over several lines and exited 1)."""
    from pathlib import Path

    if flag in ("--config-dir", "-cd"):
        if not Path(value).is_dir():
            raise ConfigError(f"{flag} {value}: {flag} must name an existing directory of config groups (it is "
                              "added to conf/ in the search path)")
        return
    conf = Path(__file__).resolve().parent.parent / "conf"
    if value == "config" and flag in ("--config-name", "-cn") or Path(value).resolve() == conf:
        return  # the primary config itself
    raise ConfigError(f"{flag} {value}: run.py has one primary config, conf/config.yaml; choose settings with "
                      "key=value overrides, +experiment=<name>, or --config-dir <dir> for your own config groups")


def _override_positions(args) -> list:
    """The positions in args of the key=value overrides (a flag's own value, as in --cfg job, left out)."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        flag = arg.partition("=")[0]
        if arg.startswith("-"):
            takes = flag in VALUE_FLAGS or (flag in FLAG_VALUES and "=" not in arg and i + 1 < len(args)
                                                and args[i + 1] in FLAG_VALUES[flag])
            skip = takes and "=" not in arg
            continue
        out.append(i)
    return out


def config_dirs(args) -> list:
    """The absolute directories that --config-dir/-cd add to the search path."""
    return [Path(_flag_value(args, i)).absolute() for i, a in enumerate(args)
            if a.partition("=")[0] in ("--config-dir", "-cd")]


def hydra_flag_overrides(args) -> list:
    """The key=value overrides of a command line that carries Hydra's flags (their own values left out)."""
    return [args[i] for i in _override_positions(args)]


def check_order(args, printing: bool = False) -> None:
    """Refuse, in one line, -m (or -r) after an override: argparse takes the overrides as one list, and the
    preflight appends the override that pins the run or sweep dir, so it would print its multi-line usage after
    that dir was claimed (a sweep dir with its .sweep.lock left behind). With Hydra's print flags nothing is claimed
    or appended, but argparse still takes only one run of overrides: an option between two overrides is refused
    too (argparse printed its usage: 'unrecognized arguments'). That case is checked by check_order(args,
    printing=True), after the keys, so that a bad key is named first; check_flags checks the other."""
    at = _override_positions(args)
    if not at or printing != any(a.split("=")[0] in PRINT_FLAGS for a in args):
        return
    for i, arg in enumerate(args):
        if i > at[0] and arg.startswith("-") and (not printing or i < at[-1]):
            options = [a for j, a in enumerate(args) if j not in at]
            overrides = [args[j] for j in at]
            raise ConfigError(f"{arg} comes after the override {args[at[0]]}: options go before the overrides, "
                              f"e.g. python run.py {' '.join(options + overrides)}")


def _quote(path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def preflight(overrides, multirun: bool) -> list:
    """Check the command line before Hydra runs; return the overrides that pin the output dir it resolved (and,
    with hydra.job.chdir=true, a relative train.resume as the absolute path checked here: the job reads it from its
    run dir). A single run is validated in full and its directory claimed here, so a refused run creates nothing."""
    for arg in overrides:
        if arg.lstrip("+~").partition("=")[0] == "hydra.mode":  # a sweep that the checks above took for a single run
            raise ConfigError(f"{arg} is not allowed: hydra.mode is set by run.py's options; start a sweep with -m "
                              "(python run.py -m key=a,b)")
    check_group_choices(overrides)
    check_keys(overrides, multirun)
    if multirun:
        composed = [_first_values(overrides)]
    else:
        composed = [list(overrides)]
    try:
        cfg = compose_config(composed[0], hydra_cfg=True)
    except Exception as err:  # noqa: BLE001
        raise composition_error(err) from None
    if multirun:
        from cli.launcher import check_gpus, check_launcher, tolerate_lost_jobs
        from cli.sweeper import check_sweeper

        check_launcher(cfg)
        check_sweeper(cfg)
        launcher = str(OmegaConf.select(cfg, "hydra.launcher._target_", default=""))
        sweeper = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default=""))
        STATE["launcher"] = launcher
        if "submitit" in launcher:
            tolerate_lost_jobs(failed_value(sweeper))
            _quiet_controllers()
        if "joblib" in launcher.lower():
            from cli import joblib_launch

            joblib_launch.install(failed_value(sweeper))
        if "optuna" in sweeper.lower():
            from cli.keys import check_swept_once
            from cli.optuna_sweep import prepare

            check_swept_once(parse_overrides(overrides))
            prepare()
        from analysis.rundir import run_path

        sweep_dir = run_path(str(resolved(cfg, "hydra.sweep.dir", "name a directory")))
        jobs = sweep_jobs(overrides, cfg)
        if jobs == []:  # e.g. range(0,0): Hydra would launch no job, write an empty summary and exit 0
            empty = next((o.input_line for o in parse_overrides(overrides)
                          if o.is_sweep_override() and not list(o.sweep_string_iterator())), "the sweep")
            raise ConfigError(f"{empty} is not allowed: it sweeps over no value, so the sweep would run no job")
        if jobs is not None:
            if launcher.endswith("LocalLauncher"):  # submitit_local runs them all at once (run.parallel_jobs)
                os.environ["ONEBIT_SWEEP_JOBS"] = str(len(jobs))
            check_some_job_runs(jobs)
            check_seed_overlap(jobs, cfg)
            check_job_dirs(jobs, cfg, sweep_dir)
        check_gpus(cfg, jobs)  # after a device this machine lacks (check_some_job_runs)
        claim_sweep(sweep_dir, bool(cfg.get("overwrite", False)))
        STATE["sweep_dir"] = sweep_dir
        return [f"hydra.sweep.dir={_quote(sweep_dir)}"]
    validate(cfg)
    from analysis.rundir import check_run_dir_setting, run_path

    pins = resume_pin(cfg)
    load_resume(cfg)
    check_run_dir_setting(resolved(cfg, "hydra.run.dir", "name a directory"))
    out = run_path(str(cfg.hydra.run.dir))
    STATE["claim"] = claim_for(cfg, out)
    return [f"hydra.run.dir={_quote(out)}"] + pins


def resume_pin(cfg) -> list:
    """Where the run would read another file than train.resume names from here, set it to the checkpoint's path as
    the OS reads it (analysis.rundir.run_path), for the checks here and the run alike, and return the override that
    pins it for the run: a path with '..' (/a/new/../b/checkpoint.pt is /a/b/checkpoint.pt, though no folder 'new'
    exists), or, with hydra.job.chdir=true, a relative one (the job reads it from its run dir). [] otherwise."""
    from analysis.rundir import run_path

    resume = OmegaConf.select(cfg, "train.resume")
    if not resume:
        return []
    path, given = run_path(str(resume)), Path(str(resume))
    if path == given.absolute() and (given.is_absolute() or not OmegaConf.select(cfg, "hydra.job.chdir")):
        return []
    cfg.train.resume = str(path)
    return [f"train.resume={_quote(path)}"]


def _quiet_controllers() -> None:
    """Under the submitit launchers: submitit_local's controllers in sessions of their own, and this process's SIGINT
    ending them without their tracebacks (cli.submitit_launch, cli.signals.on_sigint). In their own sessions the
    terminal's hangup (SIGHUP) no longer reaches them: this process's SIGHUP ends them as SIGTERM does (its jobs
    killed and recorded, the summary written), where it would have left them running unwatched."""
    import signal

    from cli import submitit_launch
    from cli.signals import on_sigint, on_sigterm

    submitit_launch.install()
    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGHUP, on_sigterm)


def _first_values(overrides) -> list:
    """The overrides with every sweep replaced by its first value (enough to resolve the sweep dir)."""
    out = []
    for o in parse_overrides(overrides):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None) if o.is_discrete_sweep() else None
            if first is None:
                continue
            out.append(f"{'+' if o.is_add() else ''}{o.key_or_group}={first}")
        else:
            out.append(o.input_line)
    return out
