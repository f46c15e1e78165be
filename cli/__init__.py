"""The command line's contract, and the run it starts.

* Before Hydra creates anything, `preflight` composes the config and checks every override: unknown keys (with or
  without '+') are refused naming the closest known keys; in a single run every value is validated, a resumed
  checkpoint is checked against the config, and the output directory is claimed (a refused run leaves no trace).
* Each run claims its own directory (analysis.rundir) and records how it ended in status.json.
* A multirun is checked before any job runs: its jobs' directories must be creatable (no file in their place, no
  name longer than the filesystem allows), no two jobs may train the same seed (seed and replicas), and the sweep
  directory is claimed for this sweep alone (an exclusive lock held until the process ends: a second sweep into it
  is refused; a lock dies with its process, so a killed sweep never blocks a re-run).
* Exit codes: 0 ok; 2 bad input, divergence or an OS error (one line on stderr); 1 a crash, or a multirun with a
  failed job (one line per failed job at the end); 128 + the signal (130 SIGINT, 143 SIGTERM) for a run or sweep
  interrupted, after its jobs' status says killed and the sweep summary is written.

The package, one job a module: state (STATE, ConfigError), values (every key's allowed values), keys (override
keys and group choices), checks (flags, and the preflight before Hydra runs), sweep (a multirun's jobs and its
lock), rundirs (claims, .hydra files, status), resume (checkpoint vs config), guards (memory, divergence),
signals (SIGINT/SIGTERM); main, here, runs them in order. The names run.py and the tests use are re-exported.
The run itself (run.py's task): build (config -> data, model, guide, objective), job (fit, evaluate, write) and
replica_job (replicas > 1), imported by run.py, not here.
"""
import logging
import signal
import sys

from cli.checks import (
    PRINT_FLAGS,
    check_flags,
    check_info_value,
    check_order,
    check_package,
    config_dirs,
    hydra_flag_overrides,
    preflight,
)
from cli.guards import check_memory, divergence, network_params
from cli.keys import EXTRA_DIRS, check_group_choices, check_keys, compose_config, composition_error, single_line
from cli.optuna_sweep import repeated_trial
from cli.resume import load_resume, resume_note, trajectory_config
from cli.rundirs import (
    claim_for,
    clear_unclaimed,
    fail,
    failed_value,
    member_resumed_in_place,
    record_unclaimed,
    refuse_replacing_job,
    release_unstarted,
    replica_dir,
    save_hydra_files,
    save_resume_overrides,
    settle_group,
    write_json,
)
from cli.signals import (interrupted, killed_reason, launcher_job, on_sigterm, requeued, stopped_reason,
                         sweep_stopping)
from cli.state import STATE, ConfigError
from cli.values import COMMAND_LINE_RULES, resolved, validate

__all__ = ["COMMAND_LINE_RULES", "STATE", "ConfigError", "check_memory", "claim_for", "clear_unclaimed", "divergence",
           "fail", "failed_value", "killed_reason", "launcher_job", "load_resume", "main", "member_resumed_in_place",
           "network_params", "on_sigterm", "record_unclaimed", "refuse_replacing_job", "repeated_trial", "replica_dir",
           "requeued", "resume_note", "save_hydra_files", "save_resume_overrides", "settle_group", "stopped_reason",
           "sweep_stopping", "trajectory_config", "validate", "write_json"]


# A run.log that cannot be written (a full disk) prints no traceback per record, in this process and in a sweep's
# workers (they import this package): the run's one line says what could not be written.
logging.raiseExceptions = False


def main(hydra_main, argv) -> int:
    """Run `hydra_main` (run.py's @hydra.main task) for argv after the preflight; return the exit code."""
    args = argv[1:]
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        from infer.validate import env_threads

        env_threads()  # importing the models sets it: a bad one was a misleading import error, or a segfault
        check_flags(args)
        EXTRA_DIRS[:] = config_dirs(args)
        overrides = hydra_flag_overrides(args)
        if any(a.split("=")[0] in PRINT_FLAGS for a in args):  # Hydra prints (help, config, info): keys checked
            check_group_choices(overrides)
            check_keys(overrides, multirun=multirun)  # a sweep without -m: Hydra's 'requires --multirun' traceback
            check_order(args, printing=True)
            if not multirun:  # a printed config holds only allowed values, as a run's does, Hydra's own keys too
                try:
                    cfg = compose_config(overrides, hydra_cfg=True)
                except Exception as err:  # noqa: BLE001  hydra's composition errors (Hydra printed a traceback)
                    raise composition_error(err) from None
                validate(cfg)
                from analysis.rundir import check_run_dir_setting

                check_run_dir_setting(resolved(cfg, "hydra.run.dir", "name a directory"))
            check_info_value(args)
            check_package(args, overrides)
            hydra_main()
            return STATE["exit"]
        signal.signal(signal.SIGTERM, on_sigterm)  # from the preflight's claim on: SIGTERM as SIGINT
        pins = preflight(overrides, multirun)
    except ValueError as err:  # ConfigError, RunDirError, CheckpointError
        print(f"error: {single_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while the preflight checked or claimed: what it claimed goes back
        return interrupted(multirun, started=False)
    sys.argv = [argv[0]] + args + pins
    try:
        hydra_main()
    except KeyboardInterrupt:
        return interrupted(multirun)
    except BaseException:  # Hydra's own exit (SystemExit) or a crash outside the task: no stale 'running' dir
        release_unstarted()
        raise
    finally:
        if not multirun:  # a replica resumed in place: its group's status.json says how the group stands now
            settle_group()
    if STATE.get("sweep_refused"):  # the sweeper refused the sweep before any job (cli.optuna_sweep)
        STATE["sweep_undo"]()
        print(f"error: {STATE['sweep_refused']}", file=sys.stderr)
        return 2
    if multirun:
        from analysis.callbacks import LAST

        failed = LAST.get("failed") or []
        for job, reason in failed:
            print(f"failed: {job}: {reason}", file=sys.stderr)
        if STATE.get("sweep_stopped"):  # the optuna sweeper stopped early, or has no best value (cli.optuna_sweep)
            print(f"stopped: {STATE['sweep_stopped']}", file=sys.stderr)
        return 1 if failed or STATE.get("sweep_stopped") else STATE["exit"]
    return STATE["exit"]
