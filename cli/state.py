"""What the command line's modules share: the process's one STATE dict and ConfigError.

STATE is a single dict per process, read and written in place by every module of the package (never rebound):
  exit        the exit code so far (run.py's task raises it through rundirs.fail)
  claim       the single run's Claim (preflight's), or the latest sweep job's
  signal      the signal (SIGINT, SIGTERM) that interrupted the run or sweep, None until one does
  sweep_lock  the fd of a multirun's lock on <sweep dir>/.sweep.lock (held until the process ends)
  sweep_dir   a multirun's sweep directory (set by the preflight)
  launcher    a multirun's hydra.launcher._target_ (set by the preflight)
  workers     the sweep's worker pids when SIGTERM arrived (set by signals.on_sigterm), and submitit_local's tasks
              once their controllers were ended (signals._end_controllers)
  signalled   the workers already sent the sweep's signal (submitit_local's tasks): stop_workers does not again
  worker      True in a joblib worker (run.py): a SIGTERM sent to it alone ends its job, and the sweep goes on
  sweep_undo  releases a multirun's claim on its sweep dir and removes what the claim created (cli.sweep)
  sweep_stopped  why the optuna sweeper ended before its trials or without a best value (cli.optuna_sweep)
  sweep_refused  why the optuna sweeper refused its search space or settings before any trial (cli.optuna_sweep)
"""

STATE = {"exit": 0, "claim": None, "signal": None, "sweep_lock": None}


class ConfigError(ValueError):
    """A config value or key outside what is allowed; its message names the key."""
