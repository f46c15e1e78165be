"""Which directories below a sweep directory are the sweep's runs, and one row per run read from them.

The sweep's jobs are those of its multirun.yaml (expected_jobs): a job directory counts when its overrides are one
of the sweep's combinations and its job number is that combination's (job_dirs); directories of an earlier launch
into the same folder, of another sweep or of a single run are left out. A job with replicas is one run per seed (its
replica directories). read_job reads a run's row: status, overrides, config summary and flattened metrics (a run
without metrics.json is a failed run). collect does both for a sweep directory.
"""
import functools
import itertools
import json
import logging
import math
import re
from pathlib import Path

log = logging.getLogger("onebit.sweep")


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


def informative_khat_max(metrics: dict) -> float:
    """The largest PSIS k-hat over the data points whose importance weights are not nearly constant (psis.ess_fraction
    below analysis.psis.CONSTANT_ESS: there k-hat fits a shape to sampling noise and says nothing); nan where no
    point's k-hat is informative, so that a summary leaves it out rather than averaging noise; nan too where q's
    support is narrower than the model's (psis.narrow: bounded weights, whose k-hat says nothing of the mass outside
    it)."""
    from .psis import CONSTANT_ESS

    if (metrics.get("psis") or {}).get("narrow"):
        return math.nan
    khat = metrics.get("khat") or []
    ess = (metrics.get("psis") or {}).get("ess_fraction")
    if not isinstance(ess, list) or not all(e is None or _is_number(e) for e in ess):  # none recorded, or garbled
        ess = [None] * len(khat)
    kept = [float(k) for k, e in zip(khat, ess) if e is None or e < CONSTANT_ESS]
    return max(kept) if kept else math.nan


def _candidates(sweep_dir: Path) -> list:
    """Every directory below sweep_dir that holds .hydra/ or metrics.json (a job, or a replica of one), sorted; not
    the files of a replaced run kept aside in a job dir (analysis.rundir.BACKUP: .replaced.<pid>/)."""
    from .rundir import BACKUP

    found = {p.parent for p in sweep_dir.rglob("metrics.json")}
    found |= {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir() and p.parent != sweep_dir}
    return sorted(p for p in found if not any(part.startswith(BACKUP) for part in p.relative_to(sweep_dir).parts))


def _launches(candidates: list) -> dict:
    """{launched job dir: [its run dirs]}: a candidate with no candidate above it is a job Hydra launched; the
    candidates below it are its replicas' dirs (one run per seed), and those its status.json lists though they are
    gone (listed_replicas). A job with replicas (status.json lists them, or replica dirs exist) is not a run itself;
    any other job is its own one run."""
    known = set(candidates)
    tops = [c for c in candidates if not any(a in known for a in c.parents)]
    out = {}
    for top in tops:
        below = [c for c in candidates if top in c.parents] + listed_replicas(top)
        out[top] = sorted(set(below)) if below else [top]
    return out


def listed_replicas(job: Path) -> list:
    """The replica dirs (<job>/seed<s>) a job's status.json lists, whether or not they are there (a listed dir that
    is gone is a run lost, read_job's failed row); [] for a job without replicas."""
    from .rundir import REPLICA_DIR, read_status

    listed = read_status(job).get("replicas")
    names = listed if isinstance(listed, list) else []
    return [job / n for n in names if isinstance(n, str) and REPLICA_DIR.fullmatch(n)]


def task_overrides(job: Path):
    """The job's task overrides: its .hydra/overrides.yaml, or where that file is lost, empty or unreadable (a
    half-written file, or one that reads as YAML but not as Hydra's overrides) the same list in its .hydra/hydra.yaml
    (hydra.overrides.task); None where neither reads (read_overrides)."""
    return read_overrides(job)[0]


_READ = None  # {job dir: read_overrides(job dir)} while collect() reads one sweep: each job's files read once


def read_overrides(job: Path) -> tuple:
    """(overrides, note) of a job: its task overrides as task_overrides finds them (None where neither file reads),
    and, where its .hydra/overrides.yaml is there but unreadable, a note saying so and where they came from instead
    ('' otherwise). Within one collect() a job's files are read and parsed once."""
    if _READ is not None:
        key = Path(job)
        if key not in _READ:
            _READ[key] = _read_overrides(key)
        return _READ[key]
    return _read_overrides(Path(job))


def _read_overrides(job: Path) -> tuple:
    hydra = job / ".hydra"
    first, why = hydra / "overrides.yaml", ""
    for path, key in ((first, None), (hydra / "hydra.yaml", "hydra.overrides.task")):
        found, problem = _override_list(path, key)
        if path == first and path.exists():
            why = problem
        if found is not None:
            return found, (f".hydra/overrides.yaml unreadable ({why}): its overrides are read from its "
                           ".hydra/hydra.yaml" if why else "")
    return None, (f".hydra/overrides.yaml unreadable ({why}), and its .hydra/hydra.yaml records none: its overrides "
                  "are unknown" if why else "")


def _override_list(path: Path, key=None) -> tuple:
    """(overrides, problem) of one of a job's .hydra files (at key, for hydra.yaml): its list of override strings,
    or None and why not ('' where the file is not there or holds none: an empty file, a half-written one)."""
    try:
        value = _yaml(path) if path.exists() else None
    except Exception:  # noqa: BLE001  a half-written file
        return None, "not YAML"
    if key is not None:
        value = select(value, key) if isinstance(value, dict) else None
    if value is None:
        return None, "empty" if path.exists() else ""
    if not isinstance(value, list):
        return None, "not a list of overrides"
    overrides = [str(o) for o in value]
    bad = _unparsable(overrides)
    return (None, f"{bad!r} is not an override Hydra can read") if bad is not None else (overrides, "")


def _unparsable(overrides: list):
    """The first of a job's override strings that is none a job runs with: one Hydra's override parser cannot parse
    (a line cut short: 'seed=['), no key=value, or a sweep (a job runs one value of each); None where all are."""
    for text in overrides:
        try:
            o = _parser().parse_overrides([text])[0]
        except Exception:  # noqa: BLE001  Hydra's OverrideParseException
            return text
        if o.is_sweep_override() or ("=" not in text and not o.is_delete()):
            return text
    return None


def _overrides(job: Path) -> list:
    """The job's task overrides (task_overrides), [] where it has none or none can be read."""
    return task_overrides(job) or []


def _hydra_job(job: Path) -> tuple:
    """(mode, number) of a launched job from its .hydra/hydra.yaml (hydra.mode: RUN for a single run, MULTIRUN for a
    sweep's job; hydra.job.num), each None where it is not recorded."""
    path = job / ".hydra" / "hydra.yaml"
    try:
        cfg = (_yaml(path) or {}) if path.exists() else {}
    except Exception:
        cfg = {}
    mode, num = select(cfg, "hydra.mode"), select(cfg, "hydra.job.num")
    return (str(mode) if mode is not None else None), (int(num) if str(num).isdigit() else None)


SWEEP_LOCK = ".sweep.lock"  # cli.sweep.claim_sweep writes the launch's pid and start time into it


def launch_line() -> str:
    """This process's launch id, as claim_sweep writes it into .sweep.lock: 'pid <pid>, started <local time>' (the
    time in status.json's 'started' format, which launch_started reads back)."""
    import os
    import time

    return f"pid {os.getpid()}, started {time.strftime('%Y-%m-%dT%H:%M:%S')}"


LAUNCH_ID = re.compile(r"pid [0-9]+, started [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}")  # launch_line's


def launch_of(sweep_dir: Path) -> str:
    """The id of the sweep last launched into sweep_dir: its .sweep.lock's line ('pid <pid>, started <time>'), which
    each of its jobs copies into its status.json ('launch'); '' where unknown: no lock, an empty one, or a line that
    is no launch id (junk, a line cut short), which tells nothing of which jobs are this launch's."""
    try:
        line = (Path(sweep_dir) / SWEEP_LOCK).read_text().strip()
    except (OSError, ValueError):  # ValueError: bytes that are not text
        return ""
    return line if LAUNCH_ID.fullmatch(line) else ""


def launch_started(sweep_dir: Path) -> str:
    """When the sweep last launched into sweep_dir began ('YYYY-MM-DDTHH:MM:SS', as status.json's 'started'); ''
    where unknown."""
    found = re.search(r"started (\S+)", launch_of(sweep_dir))
    return found.group(1) if found else ""


def of_this_launch(status: dict, sweep_dir: Path, unknown: bool = True) -> bool:
    """Whether a job's status.json belongs to the sweep last launched into sweep_dir: by the launch id it copied
    (clock-free), or, for a status.json without one, by its start time against the launch's; `unknown` where
    neither can tell."""
    launch = launch_of(sweep_dir)
    if status.get("launch") and launch:
        return status["launch"] == launch
    since, started = launch_started(sweep_dir), str(status.get("started") or "")
    return started >= since if since and started else unknown


def _of_earlier_launches(sweep_dir: Path, launches) -> list:
    """The job dirs of an earlier launch into sweep_dir (of_this_launch false), even where their overrides match
    this one's (a relaunch with overwrite=true that was interrupted before it reached them; optuna, which writes
    no multirun.yaml)."""
    from .rundir import read_status

    return [job for job in launches if (status := read_status(job)) and not of_this_launch(status, sweep_dir)]


def job_dirs(sweep_dir: Path) -> tuple:
    """(runs, launched, left_out, missing) of the sweep last launched into sweep_dir.

    Its jobs are the combinations of its multirun.yaml (expected_jobs, in Hydra's order: job number i runs
    combination i). A launched job directory belongs to this sweep when its overrides are one of them and, where
    its hydra.yaml records a job number, that number is the combination's (any of the sweep's numbers where Hydra
    drew the order at random: a shuffle(), expand_sweep). A job directory left by an earlier
    launch into the same folder (overwrite=true is itself an override, so a re-run never matches an old job), by
    a sweep started at the same time, or by a single run (hydra.mode RUN) matches none: it is left out. runs: the
    run directories of this sweep's jobs (a replica's dir per seed, sorted); launched: its job directories;
    left_out: the job directories of other launches; missing: the override strings of combinations without a
    job directory of this launch. A job dir whose run started before this launch (.sweep.lock) is left out too.
    Without a multirun.yaml that can be expanded every other job directory counts and missing is []. A replica
    group's own directory (a single run with replicas) is one job, whose runs are its replicas."""
    from .rundir import read_status

    candidates = _candidates(sweep_dir)
    if read_status(sweep_dir).get("replicas"):  # a single run of replicas given on its own: one job, its replicas
        candidates = [sweep_dir] + candidates
    launches = _launches(candidates)
    earlier = _of_earlier_launches(sweep_dir, launches)  # job dirs an earlier launch left, whatever they match
    for job in earlier:
        launches.pop(job)
    expected, shuffled = expand_sweep(sweep_dir)
    if not expected:
        return sorted(r for runs in launches.values() for r in runs), sorted(launches), sorted(earlier), []
    index = {}
    for i, combo in enumerate(expected):
        index.setdefault(_norm(combo, shuffled), set()).add(i)
    launched, left_out, done, by_num = [], list(earlier), set(), {}
    for job in sorted(launches):
        mode, num = _hydra_job(job)
        overrides = task_overrides(job)
        if overrides is not None:
            nums = index.get(_norm(overrides, shuffled), set())
        else:  # neither overrides file reads: its job number, where this launch ran it, says which combination it is
            nums = {num} if num is not None and num < len(expected) and not shuffled and of_this_launch(
                read_status(job), sweep_dir, unknown=False) else set()
        if nums and mode != "RUN" and (num is None or _numbered(num, nums, len(expected), shuffled)):
            launched.append(job)
            done |= {num} if num is not None and not shuffled else nums
            if num is not None:
                by_num.setdefault(num, []).append(job)
        else:
            left_out.append(job)
    for num, jobs in by_num.items():  # one job number, two dirs (an earlier launch's run put back where this launch's
        if len(jobs) > 1:  # job was refused, recorded in _refused/): the latest started is this launch's
            latest = max(jobs, key=lambda j: (str(read_status(j).get("started", "")), "_refused" in j.parts))
            for job in jobs:
                if job != latest:
                    launched.remove(job)
                    left_out.append(job)
    missing = [" ".join(combo) for i, combo in enumerate(expected) if i not in done]
    return sorted(r for job in launched for r in launches[job]), launched, left_out, missing


def _numbered(num: int, nums: set, count: int, shuffled) -> bool:
    """Whether job number num may have run a combination of the positions nums among the sweep's count: the position
    itself, or, where Hydra drew the order at random (shuffled keys), any job number of the sweep."""
    return num < count if shuffled else num in nums


def _group_replicas(job: Path, overrides: list) -> list:
    """A replica's overrides with its group's `replicas` (a replica dir records replicas=1, so that `python run.py
    <its overrides>` runs it alone; the sweep trained it in a group, as the group's overrides say, or its config)."""
    from .rundir import is_listed_replica

    if not is_listed_replica(job):
        return overrides
    given = _overrides(job.parent)  # none readable: the replica's own overrides, less replicas=1
    key = lambda o: o.lstrip("+~").partition("=")[0]  # noqa: E731
    return [o for o in overrides if key(o) != "replicas"] + [o for o in given if key(o) == "replicas"]


def read_job(job: Path, sweep_dir: Path, ended: bool = False) -> dict:
    """One row: status, overrides, config summary (model, guide, n, seed) and flattened metrics. A status.json that is
    there but cannot be read is said in the row's error; the run is then judged by its metrics.json alone (as one
    whose status.json is lost). So is an unreadable .hydra/overrides.yaml (read_overrides)."""
    from .rundir import load_status

    if not job.exists():  # a replica its group's status.json lists, whose dir is gone
        return _lost_replica(job, sweep_dir)
    status, problem = load_status(job)  # read once: the record the row is judged by, and why it may not read
    row = _read_row(job, sweep_dir, status, ended)
    if problem:
        said = f"its status.json is unreadable ({problem})" + (": judged by its metrics.json" if row["status"] == "ok"
                                                               else "")
        row["error"] = "; ".join(p for p in (row.get("error"), said) if p)
    unread = read_overrides(job)[1]
    if unread:
        row["error"] = "; ".join(p for p in (row.get("error"), unread) if p)
    return row


def _head(job: Path, sweep_dir: Path, overrides: list, config_of: Path) -> dict:
    """A row's first columns: job, status ok, overrides, and the config summary (model, guide, n, seed, beta) from
    config_of's .hydra/config.yaml (error says so where it cannot be read)."""
    row = {"job": str(job.relative_to(sweep_dir)) if job != sweep_dir else ".", "status": "ok"}
    cfg = {}
    if (config_of / ".hydra" / "config.yaml").exists():
        try:
            cfg = _yaml(config_of / ".hydra" / "config.yaml") or {}
        except Exception as err:  # a half-written config: still list the job
            row["error"] = f"config.yaml unreadable: {err}"
    row["overrides"] = " ".join(overrides)
    row["_overrides"] = {k: canonical(v) for k, v in (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)}
    from .describe import dotted

    row["_config"] = dotted(cfg) if isinstance(cfg, dict) else {}  # every setting it ran with (aggregate.settled)
    row.update({"model": select(cfg, "model.name"), "guide": select(cfg, "guide.name"),
                "n": select(cfg, "data.n"), "seed": select(cfg, "seed"), "beta": select(cfg, "train.beta")})
    return row


def canonical(value) -> str:
    """An override's value as one text, whichever interface wrote it (an override's text, or a Python run's
    `arguments` value from its metrics.json): the text of its canonical_value, so that two values get one text
    exactly where the command line would read them as one value (1e-2, 0.01 -> 0.01; 300, 300.0 -> 300; 'x', x -> x;
    True -> true; [1,0.99], [1.0, 0.99] -> [1,0.99]). A text Hydra cannot read as one value is kept as written."""
    if isinstance(value, str):
        parsed = _parsed(value)
        if parsed is None or parsed.is_sweep_override():  # not one override value: its own text
            return value
        value = parsed.value()
    return _text_of(canonical_value(value))


def _parsed(text: str):
    """Hydra's Override for key=text; None where its parser cannot read text."""
    try:
        return _plain_parser().parse_overrides([f"k={text}"])[0]
    except Exception:  # noqa: BLE001  Hydra's OverrideParseException
        return None


def _text_of(key) -> str:
    """canonical_value's form as override text."""
    kind, value = key
    if kind == "const":
        return "null" if value is None else str(value).lower()
    if kind == "list":
        return "[" + ",".join(_text_of(v) for v in value) + "]"
    if kind == "dict":
        return "{" + ",".join(f"{_text_of(k)}:{_text_of(v)}" for k, v in value) + "}"
    if kind == "number" and isinstance(value, float):
        return repr(value)
    if kind == "str" and _reads_as_other(value):  # '1' (a string) stays apart from 1 (a number)
        return f"'{value}'"
    return str(value)


def _reads_as_other(text: str) -> bool:
    """Whether text, unquoted, is read by Hydra as something other than that string (a number, true, null, a list,
    a sweep); False where it cannot be read at all (it is then written as it is)."""
    parsed = _parsed(text)
    return parsed is not None and (parsed.is_sweep_override() or parsed.value() != text
                                   or not isinstance(parsed.value(), str))


def _lost_replica(job: Path, sweep_dir: Path) -> dict:
    """The row of a replica whose dir is gone though its group's status.json lists it: failed, saying so, with its
    group's config and overrides and its own seed (seed<s>)."""
    seed = int(job.name[len("seed"):])
    overrides = [o for o in _overrides(job.parent) if o.lstrip("+~").partition("=")[0] != "seed"] + [f"seed={seed}"]
    row = _head(job, sweep_dir, overrides, job.parent)
    error = f"its replica dir {job.name} is missing (its group's status.json lists it: deleted or moved since)"
    row.update({"seed": seed, "status": "failed", "error": "; ".join(p for p in (error, row.get("error")) if p)})
    return row


def _read_row(job: Path, sweep_dir: Path, status: dict, ended: bool = False) -> dict:
    """read_job's row, from the run's files as they read (status: its status.json's record, {} where unreadable)."""
    overrides = _group_replicas(job, _overrides(job))
    row = _head(job, sweep_dir, overrides, job)
    from .rundir import STATUS

    lost = not (job / STATUS).exists()
    if isinstance(status.get("launcher_job"), str) and status["launcher_job"]:
        row["launcher_job"] = status["launcher_job"]  # submitit's job id: where its console output is
    if status.get("status") not in (None, "ok"):  # refused, diverged, failed, or still running (killed)
        row["status"] = status["status"]
        row["error"] = status.get("reason") or ""
        if status["status"] == "running" and not row["error"]:
            row["status"], row["error"] = judge_running(job, status, ended)
        if status["status"] != "diverged" or not (job / "metrics.json").exists():
            return row
    metrics_path = job / "metrics.json"
    if not metrics_path.exists():
        row["status"] = "failed"
        row["error"] = row.get("error") or (
            "its status.json says ok but its metrics.json is missing (deleted or moved since)" if status
            else "no metrics.json (and no status.json: killed before it started?)" if lost else "no metrics.json")
        return row
    try:
        metrics = json.loads(metrics_path.read_text())
    except ValueError as err:
        row["status"], row["error"] = "failed", f"metrics.json unreadable: {err}"
        return row
    if not isinstance(metrics, dict):
        from .rundir import json_kind

        row["status"], row["error"] = "failed", f"metrics.json unreadable: not a JSON object ({json_kind(metrics)})"
        return row
    wrong = _malformed(metrics)
    if wrong:
        row["status"], row["error"] = "failed", f"metrics.json malformed: {wrong}"
        return row
    for key in ("model", "guide", "n", "seed"):
        if row[key] is None and key in metrics:
            row[key] = metrics[key]
    if row.get("beta") is None and _is_number(metrics.get("beta", 1.0)):  # no config (a run written from Python):
        row["beta"] = metrics.get("beta", 1.0)  # its metrics.json records a KL weight only where it is not 1
    arguments = metrics.get("arguments")
    if not overrides and isinstance(arguments, dict) and arguments:  # a run written from Python: its networks' settings
        row["_overrides"] = {str(k): canonical(v) for k, v in arguments.items()}
        row["overrides"] = " ".join(f"{k}={v}" for k, v in row["_overrides"].items())
    if not row["_config"] and isinstance(metrics.get("settings"), dict):  # a run written from Python: describe's
        row["_config"] = {str(k): v for k, v in metrics["settings"].items()}
    row.update({k: v for k, v in flatten(metrics).items() if k not in ("model", "guide", "n", "seed", "status")
                and not k.startswith(("arguments.", "settings."))})
    if row["status"] == "ok" and metrics.get("status") not in (None, "ok"):  # its metrics.json says otherwise
        row["status"] = str(metrics["status"])
        row["error"] = metrics.get("reason") or (f"its metrics.json says {metrics['status']}"
                                                 + ("" if status or not lost else " (and it has no status.json)"))
    if row["status"] == "ok" and not _is_number(metrics.get("loss")):  # no headline to count
        row["status"], row["error"] = "failed", _no_headline(metrics)
    if "khat.max" in row:
        row["khat.max"] = informative_khat_max(metrics)
    if (job / "encodings.nc").exists():
        row["encodings"] = str(job / "encodings.nc")
    return row


# The metrics.json fields the summary reads as names, keys or blocks, and what each must be where it is not null.
FIELD_KINDS = {"model": (str, "a string"), "guide": (str, "a string"), "n": (int, "a whole number"),
               "seed": (int, "a whole number"), "status": (str, "a string"), "reason": (str, "a string"),
               "loss_estimator": (str, "a string"), "estimator": (str, "a string"), "psis": (dict, "an object"),
               "khat": (list, "an array")}


def _malformed(metrics: dict) -> str:
    """What is wrong with the first of FIELD_KINDS that metrics holds as something else ("its 'n' is a string, not a
    whole number"); '' where none is."""
    from .rundir import json_kind

    for key, (kind, wanted) in FIELD_KINDS.items():
        value = metrics.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"its '{key}' is {json_kind(value)}, not {wanted}"
    return ""


def _is_number(value) -> bool:
    """Whether value is a finite number (not a bool, a string or None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _no_headline(metrics: dict) -> str:
    """Why a run whose metrics.json says ok has no headline loss to count: none recorded, or one that is no
    finite number (quoted)."""
    if "loss" not in metrics:
        return "its metrics.json has no headline loss"
    return f"its headline loss is not a finite number: {json.dumps(metrics['loss'])[:60]}"


def expected_jobs(sweep_dir: Path) -> list:
    """The override lists of every job the sweep was meant to run (from multirun.yaml), or [] if unknown; in Hydra's
    order where the sweep draws nothing at random (see expand_sweep)."""
    return expand_sweep(sweep_dir)[0]


def expand_sweep(sweep_dir: Path) -> tuple:
    """(jobs, shuffled) of the sweep in sweep_dir's multirun.yaml: jobs as expected_jobs gives them ([] if unknown),
    and the keys whose values Hydra drew at random when it launched them (those written with shuffle(): a shuffled
    sweep's order, a shuffled list's order), which a second expansion draws anew. Where shuffled is not empty,
    job number i need not run jobs[i], and a shuffled list value is written as given (key=shuffle([...]))."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return [], frozenset()
    try:
        cfg = _yaml(path)
        task = list(select(cfg, "hydra.overrides.task", []) or [])
        params = select(cfg, "hydra.sweeper.params", {}) or {}
        args = [f"{k}={v}" for k, v in params.items()] + task
        sources = [Path(str(s.get("path"))) for s in select(cfg, "hydra.runtime.config_sources", []) or []
                   if isinstance(s, dict) and s.get("schema") == "file"]
        parsed = _parser(GroupChoices(sources)).parse_overrides(args)
        keys, axes, seen, shuffled = [], [], {}, set()
        for o in parsed:
            key = o.get_key_element()
            drawn = _draws_at_random(o)
            if drawn:
                shuffled.add(_plain_key(key))
            else:
                shuffled.discard(_plain_key(key))  # the command line replaced the config's shuffled sweep
            values = (list(o.sweep_string_iterator()) if o.is_sweep_override()
                      else [o.input_line.partition("=")[2].strip()] if drawn else [o.get_value_element_as_str()])
            if key in seen:  # the command line overrides the config's sweep params
                axes[seen[key]] = values
            else:
                seen[key] = len(keys)
                keys.append(key)
                axes.append(values)
        return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*axes)], frozenset(shuffled)
    except Exception as err:  # an exotic sweeper: no missing-job check
        log.warning("could not expand the sweep in %s (%s); missing jobs are not checked", path, err)
        return [], frozenset()


def _draws_at_random(override) -> bool:
    """Whether Hydra draws an override's values at random each time it parses it: one written with shuffle() (of a
    sweep: its order; of a list: the list's order), the only grammar function that does."""
    return "shuffle(" in override.input_line.replace(" ", "")


def _plain_key(key: str) -> str:
    """An override's key without its '+', '++' or '~' prefix, as _norm compares it."""
    return str(key).lstrip("+~")


def options_in(folders, group: str) -> list:
    """The options of a config group: the stems of the yaml files in <folder>/<group>/ of each folder, sorted."""
    return sorted({p.stem for folder in folders for p in (Path(folder) / group).glob("*.yaml")})


class GroupChoices:
    """What a glob() sweep chooses among, as Hydra's parsed overrides ask it (Override.config_loader, which Hydra's
    own sweeper sets to its config loader): a config group's options in `folders` (the sweep's file config sources:
    conf/ and any --config-dir)."""

    def __init__(self, folders):
        self.folders = folders

    def get_group_options(self, group_name, results_filter=None, config_name=None, overrides=None) -> list:
        return options_in(self.folders, str(group_name).split("@")[0])


def _norm(overrides, shuffled=frozenset()) -> frozenset:
    """The overrides as a set to compare job against job: prefixes and spaces dropped; the value of a key in shuffled
    (expand_sweep: drawn at random) read as Hydra parses it, a list's elements in sorted order, so that
    key=shuffle([a,b]) matches the key=[b,a] Hydra drew for the job."""
    out = set()
    for o in overrides:
        text = _plain_key(o).replace(" ", "")
        key, _, value = text.partition("=")
        out.add(f"{key}={_unordered(key, value)!r}" if key in shuffled else text)
    return frozenset(out)


def _unordered(key: str, value: str):
    """The value of key=value as Hydra parses it (canonical_value), a list's elements sorted; the text itself where
    Hydra cannot parse it."""
    try:
        parsed = _parser().parse_overrides([f"{key}={value}"])[0]
        element = parsed.value() if not parsed.is_sweep_override() else value
    except Exception:  # noqa: BLE001  Hydra's OverrideParseException: compared as written
        return value
    canon = canonical_value(element)
    return ("list", tuple(sorted(canon[1], key=repr))) if isinstance(element, list) else canon


def canonical_value(value):
    """A parsed override value (Hydra's: int, float, bool, str, QuotedString, None, list, dict) as the value the config
    holds, in a form two spellings of one value share: 1 and 1.0, 1e-3 and 0.001, 'x' and x, true and True compare
    equal; 1 and true, 1 and '1' do not (the config holds another kind of value)."""
    import math

    from hydra.core.override_parser.types import QuotedString

    if isinstance(value, QuotedString):
        return ("str", value.text)
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return ("number", "nan")
        return ("number", int(value) if isinstance(value, int) or value.is_integer() else value)
    if isinstance(value, (list, tuple)):
        return ("list", tuple(canonical_value(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((canonical_value(k), canonical_value(v)) for k, v in value.items()), key=repr)))
    return ("str", str(value))


def _parser(config_loader=None):
    """Hydra's override parser; one with a config loader where a glob() sweep asks it for a group's options."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=config_loader) if config_loader is not None else _plain_parser()


@functools.lru_cache(maxsize=None)
def _plain_parser():
    """Hydra's override parser without a config loader, made once (making one builds its grammar's tables)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def collect(sweep_dir, ended: bool = False) -> dict:
    """This sweep's runs (job_dirs): dict(rows=[one row per run dir], launched=[its job dirs], left_out=[job dirs of
    other launches], missing=[override strings of its jobs without a directory]). ended: the sweep's launcher has
    returned every job (its end callback), so a job whose status.json still says running was lost, wherever it ran."""
    global _READ
    sweep_dir = Path(sweep_dir)
    _READ = {}
    try:
        runs, launched, left_out, missing = job_dirs(sweep_dir)
        return {"rows": [read_job(j, sweep_dir, ended) for j in runs], "launched": launched, "left_out": left_out,
                "missing": missing}
    finally:
        _READ = None


def judge_running(job: Path, status: dict, ended: bool = False) -> tuple:
    """(status, why) of a job whose status.json still says running: running where its process is alive (pid) or
    where it ran on another host, which this one cannot tell, unless the sweep has ended (every job returned); failed
    where its process is gone without recording how."""
    import socket

    from .rundir import live_owner

    host = status.get("host")
    elsewhere = bool(host) and host != socket.gethostname()
    if elsewhere and not ended:
        return "running", (f"still running on {host}, or killed there (its status.json says running; this host "
                           "cannot tell)")
    pid = None if elsewhere else live_owner(job)
    if pid is not None:
        return "running", f"still running (pid {pid})"
    resumes = "; its checkpoint.pt resumes it" if (job / "checkpoint.pt").exists() else ""
    where = f" on {host}" if elsewhere else ""
    return "failed", (f"killed: its process (pid {status.get('pid')}{where}) ended without recording how (SIGKILL, "
                      f"out of memory, or its launcher){resumes}")
