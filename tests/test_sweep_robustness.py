"""A sweep against its environment: another sweep in its dir, job dirs that cannot be made, seeds trained twice,
SIGTERM, and what a replica's directory holds. Every refusal is one line before any job runs (exit 2)."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, but, run_cli

FAST = ["data.n=3", "train.steps=50", "train.num_particles=8", "eval.samples=10000", "eval.replicates=4",
        "eval.figures=false"]


def one_line_error(proc, *words) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def statuses(root: Path) -> dict:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in root.rglob("status.json")}


# ---------------------------------------------------------------------------------------------------------------
# the sweep dir is this sweep's alone


def test_a_sweep_into_a_dir_another_sweep_holds_is_refused_before_any_job_runs(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    fd = os.open(sweep / ".sweep.lock", os.O_CREAT | os.O_RDWR)  # a sweep running into it holds this lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = run_cli("-m", *FAST, "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    finally:
        os.close(fd)
    assert proc.returncode == 2
    one_line_error(proc, str(sweep), "in use by another sweep")
    assert sorted(p.name for p in sweep.iterdir()) == [".sweep.lock"]


LAUNCH = "pid 7, started 2026-12-02T00:00:00"


@pytest.mark.parametrize("line, holder", [(f"{LAUNCH}\n".encode(), LAUNCH), (b"\xff\xfe junk", "still running")],
                         ids=["launch id", "not text"])
def test_a_dir_another_sweep_holds_is_refused_naming_its_launch_id_where_the_lock_has_one(tmp_path, line, holder):
    from analysis.rundir import RunDirError
    from cli.sweep import claim_sweep

    fd = os.open(tmp_path / ".sweep.lock", os.O_CREAT | os.O_RDWR)  # a sweep running into it holds this lock
    os.write(fd, line)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RunDirError, match=f"is in use by another sweep \\({holder}\\);"):
            claim_sweep(tmp_path, overwrite=False)
    finally:
        os.close(fd)


def test_a_bad_value_every_job_shares_refuses_the_sweep_before_any_job_starts(tmp_path):
    proc = run_cli("-m", *FAST, "seed=0,1", "train.steps=-1", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "train.steps=-1 is not allowed", "every one of the sweep's 2 jobs is refused",
                   "none was started")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow  # an end-to-end CLI run: the default suite stays under 10 minutes
def test_a_bad_value_in_some_jobs_refuses_those_jobs_and_the_others_run(tmp_path):
    proc = run_cli("-m", *but(FAST, "train.steps"), "train.steps=-1,50", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    found = {s["status"] for s in statuses(tmp_path / "sweep").values()}
    assert found == {"ok", "refused"}


@pytest.mark.slow  # an end-to-end CLI run: the default suite stays under 10 minutes
def test_the_claim_on_a_sweep_dir_ends_with_its_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    first = run_cli("-m", *FAST, "seed=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = run_cli("-m", *FAST, "seed=0", "overwrite=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_a_job_that_cannot_claim_its_dir_is_listed_as_refused_and_the_run_there_is_kept(tmp_path):
    sweep = tmp_path / "sweep"
    other = sweep / "data.n=3,seed=1,train.steps=50"  # a run already there (no multirun.yaml: not a sweep)
    other.mkdir(parents=True)
    (other / "status.json").write_text('{"status": "ok", "reason": "another run"}')
    proc = run_cli("-m", "data.n=3", "seed=0,1", "train.steps=50", "eval.figures=false", f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert proc.returncode == 1
    assert [p.name for p in other.iterdir()] == ["status.json"]  # nothing written there, not even run.log
    summary = (sweep / "summary.md").read_text()
    assert "REFUSED" in summary and "already holds a run" in summary and "seed=1" in summary
    assert "MISSING" not in summary
    (failed,) = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert "refused: its job dir could not be claimed" in failed


def test_jobs_that_would_share_a_job_dir_refuse_the_sweep_up_front(tmp_path):
    proc = run_cli("-m", *FAST, "seed=0,1", "hydra.sweep.dir=sweep", "hydra.sweep.subdir=one", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "hydra.sweep.subdir", "would share the job dir")
    assert not (tmp_path / "sweep").exists()


def test_one_value_written_two_ways_refuses_the_sweep_up_front_naming_both(tmp_path):
    proc = run_cli("-m", *FAST, "train.beta=1,1.0", "hydra.sweep.dir=sweep", cwd=tmp_path)
    one_line_error(proc, "train.beta=1,1.0 is not allowed: 1 and 1.0 are one value of train.beta written two ways",
                   "list each value once")
    assert proc.returncode == 2 and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("sweep, said", [
    ("train.beta=1,1.0", "1 and 1.0 are one value of train.beta written two ways"),
    ("train.beta=choice(0.5,1,1.0)", "1 and 1.0 are one value of train.beta written two ways"),
    ("train.beta=sort(1.0,1)", "1.0 and 1 are one value of train.beta written two ways"),
    ("optim.lr=1e-3,0.001", "it lists the value 0.001 of optim.lr twice"),
    ("eval.noise=mc,'mc'", "mc and 'mc' are one value of eval.noise written two ways"),
    ('eval.noise=lattice,"lattice"', "lattice and \"lattice\" are one value of eval.noise written two ways"),
    ("eval.figures=true,True", "it lists the value True of eval.figures twice"),
    ("seed=0,0", "it lists the value 0 of seed twice"),
    ("seed=1_000,1000", "it lists the value 1000 of seed twice"),
    ("optim.betas=[0.9,0.99],[0.90,0.99]", "it lists the value [0.9,0.99] of optim.betas twice"),
    ("optim.betas=[1,0.99],[1.0,0.99]", "[1,0.99] and [1.0,0.99] are one value of optim.betas written two ways"),
])
def test_a_sweep_listing_one_value_twice_is_refused_naming_the_key_and_both_spellings(sweep, said):
    from cli.state import ConfigError
    from cli.sweep import check_distinct_values

    with pytest.raises(ConfigError) as err:
        check_distinct_values(["data.n=3", sweep])
    assert str(err.value).startswith(f"{sweep} is not allowed: {said} (as Hydra reads them)")


@pytest.mark.parametrize("sweep", ["seed=1,true", "seed=1,'1'", "train.beta=1,1.5", "eval.noise=mc,qmc",
                                   "optim.betas=[0.9,0.99],[0.99,0.9]"])
def test_values_hydra_reads_as_different_values_are_a_sweep(sweep):
    from cli.sweep import check_distinct_values

    check_distinct_values(["data.n=3", sweep])  # the jobs' configs differ (a job refuses its own bad value)


def test_a_value_the_config_sweeps_replaced_on_the_command_line_is_not_counted_twice():
    from cli.sweep import check_distinct_values

    check_distinct_values(["seed=0,0", "seed=0,1"])  # hydra.sweeper.params, then the command line, which wins


@pytest.mark.slow  # an end-to-end CLI run: the default suite stays under 10 minutes
def test_overwrite_true_reruns_a_sweep_in_its_own_job_dirs(tmp_path):
    for extra in ([], ["overwrite=true"]):
        proc = run_cli("-m", *FAST, "seed=0", *extra, "hydra.sweep.dir=sweep", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert len([p for p in (tmp_path / "sweep").iterdir() if p.is_dir()]) == 1


# ---------------------------------------------------------------------------------------------------------------
# job dirs that cannot be made


def test_a_file_in_place_of_a_job_dir_refuses_the_sweep_up_front(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    blocker = sweep / "data.n=3,seed=0,train.steps=50"
    blocker.write_text("not a directory")
    proc = run_cli("-m", "data.n=3", "seed=0,1", "train.steps=50", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "hydra.sweep.dir", str(blocker), "is a file")
    assert sorted(p.name for p in sweep.iterdir()) == [blocker.name] and blocker.read_text() == "not a directory"


@pytest.mark.parametrize("path", ["ck/full.pt", "../../outside/full.pt"], ids=["folders", "way_out"])
def test_a_path_in_a_swept_value_that_would_make_job_dir_folders_refuses_the_sweep(tmp_path, path):
    proc = run_cli("-m", f"train.resume={tmp_path / path}", "train.steps=200,300", f"hydra.sweep.dir={tmp_path / 's'}",
                   cwd=tmp_path)
    one_line_error(proc, "hydra.sweep.subdir", "not one folder in", "exclude_keys")
    assert list(tmp_path.iterdir()) == []


def test_a_nested_job_dir_layout_of_ones_own_runs_and_is_summarised(tmp_path):
    proc = run_cli("-m", "hydra.sweep.subdir=${model.name}/${hydra:job.num}", "data.n=3", "train.steps=20",
                   "eval.figures=false", "seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 jobs, 2 runs (0 failed, 0 missing" in proc.stdout + proc.stderr
    launch = (tmp_path / "s" / ".sweep.lock").read_text().strip()  # each job records its launch: no clocks compared
    assert [json.loads(p.read_text())["launch"] for p in (tmp_path / "s").rglob("status.json")] == [launch] * 2


def test_a_job_dir_name_longer_than_the_filesystem_allows_refuses_the_sweep_up_front(tmp_path):
    many = ["train.beta=1.0", "train.warmup=0", "train.warmup_start=0.0", "train.average=0.0",
            "train.checkpoint_every=1000", "train.log_every=100", "eval.tol=1e-4", "eval.iwae_k=1000",
            "eval.noise=lattice", "optim.lr=0.001", "memory_gb=2", "device=cpu", "threads=1", "overwrite=false",
            "train.freeze_model=false", "train.progress=false"]
    proc = run_cli("-m", *FAST, *many, "seed=0,1", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "hydra.sweep.subdir", "at most 255", "hydra.sweep.subdir=${hydra:job.num}")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow  # an end-to-end CLI run: the default suite stays under 10 minutes
def test_a_short_subdir_lets_the_same_sweep_run(tmp_path):
    proc = run_cli("-m", *FAST, "train.warmup=0", "seed=0,1", "hydra.sweep.dir=sweep", "hydra.sweep.subdir=${hydra:job.num}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {s["status"] for s in statuses(tmp_path / "sweep").values()} == {"ok"}
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]


# ---------------------------------------------------------------------------------------------------------------
# seeds


def test_replicas_that_would_train_a_seed_twice_are_refused_naming_seed_and_replicas(tmp_path):
    proc = run_cli("-m", *FAST, "replicas=2", "seed=0,1", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "seed and replicas", "seed 1 would be trained twice", "seed=0,2")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow  # an end-to-end CLI run: the default suite stays under 10 minutes
def test_replicas_a_stack_apart_are_one_run_per_seed(tmp_path):
    proc = run_cli("-m", *FAST, "replicas=2", "seed=0,2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = [s for k, s in statuses(tmp_path / "sweep").items() if "/seed" in k]
    assert len(runs) == 4 and {s["status"] for s in runs} == {"ok"}


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM


def _children(pid: int) -> list:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("launcher, sig", [
    ([], signal.SIGTERM),
    pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], signal.SIGINT,  # joblib ends its workers
                 marks=pytest.mark.slow),  # itself first
], ids=["basic", "joblib", "joblib_sigint"])
def test_sigterm_ends_a_sweep_as_sigint_does_with_its_summary_and_no_workers_left(tmp_path, launcher, sig):
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(ROOT / "run.py"), "-m", "data.n=3", "seed=0,1,2", "train.steps=100000",
            "train.checkpoint_every=0", "eval.figures=false", *launcher, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    running = 2 if launcher else 1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(s["status"] == "running" for s in statuses(sweep).values()) < running:
        time.sleep(0.2) if sweep.exists() else time.sleep(0.5)
    workers = _children(proc.pid)
    time.sleep(1.0)
    proc.send_signal(sig)  # to the sweep's own pid only, not its process group
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {name}" in err
    jobs = statuses(sweep)
    assert len(jobs) == running and all(s["status"] == "failed" and f"killed by {name}" in s["reason"]
                                        for s in jobs.values()), jobs
    summary = (sweep / "summary.md").read_text()
    assert summary.count(f"killed by {name}") == running and summary.count("MISSING") == 3 - running
    time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)], "workers left running after the sweep ended"


def _descendants(pid: int) -> list:
    out, frontier = [], [pid]
    while frontier:
        frontier = [c for p in frontier for c in _children(p)]
        out += frontier
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig, to_group", [(signal.SIGINT, True),
                                           pytest.param(signal.SIGTERM, False, marks=pytest.mark.slow),
                                           pytest.param(signal.SIGHUP, False, marks=pytest.mark.slow)],
                         ids=["ctrl_c", "sigterm", "sighup"])
def test_a_submitit_local_sweep_stops_in_one_line_without_tracebacks_and_labels_its_runs(tmp_path, sig, to_group):
    """Ctrl-C (SIGINT to the terminal's process group), SIGTERM or a hangup (SIGHUP) to the sweep: submitit's job
    controllers printed a KeyboardInterrupt traceback each, and on SIGTERM the runs said 'killed by SIGINT'
    (cli.submitit_launch); in sessions of their own, a hangup must still end them."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(ROOT / "run.py"), "-m", "data.n=3", "seed=0,1", "train.steps=100000",
            "train.checkpoint_every=0", "eval.figures=false", "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(s["status"] == "running" for s in statuses(sweep).values()) < 2:
        time.sleep(0.2) if sweep.exists() else time.sleep(0.5)
    workers = _descendants(proc.pid)
    time.sleep(1.0)
    os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and err.count("error: ") == 1 and f"error: interrupted by {name}" in err, err
    jobs = statuses(sweep)
    assert len(jobs) == 2 and all(s["status"] == "failed" and f"killed by {name}" in s["reason"]
                                  for s in jobs.values()), jobs
    time.sleep(0.5)
    assert len(workers) >= 4 and not [pid for pid in workers if _alive(pid)], "controllers or jobs left running"


# ---------------------------------------------------------------------------------------------------------------
# a replica's directory is its single run's


def test_a_replicas_job_lists_its_replicas_before_training_and_marks_them_killed(tmp_path, monkeypatch):
    import infer.fit_replicas
    import run
    from analysis.rundir import read_status
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, "replicas=2"])
    seen = {}

    def interrupted_fit(*args, on_start=None, **kwargs):
        on_start()
        seen["status"] = read_status(tmp_path)
        raise KeyboardInterrupt  # as SIGINT, or SIGTERM through cli.on_sigterm, in the first step

    monkeypatch.setattr(infer.fit_replicas, "fit_replicas", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        run.run(cfg, tmp_path)
    assert seen["status"]["status"] == "running" and seen["status"]["replicas"] == ["seed0", "seed1"]
    for name in ("seed0", "seed1"):
        status = read_status(tmp_path / name)
        assert status["status"] == "failed" and "killed by SIGINT" in status["reason"]


@pytest.mark.slow  # an end-to-end CLI run: the default suite stays under 10 minutes
def test_a_replicas_dir_holds_what_its_single_run_writes_and_its_overrides_rerun_it_alone(tmp_path):
    proc = run_cli(*FAST, "+experiment=study", "model=vae", "seed=0", "hydra.run.dir=stack", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    replica = tmp_path / "stack" / "seed1"
    assert {p.name for p in replica.iterdir()} >= {".hydra", "run.log", "metrics.json", "history.csv",
                                                   "checkpoint.pt", "status.json"}
    assert {p.name for p in (replica / ".hydra").iterdir()} == {"config.yaml", "overrides.yaml", "hydra.yaml"}
    config = OmegaConf.load(replica / ".hydra" / "config.yaml")
    assert config.replicas == 1 and config.seed == 1
    overrides = [str(o) for o in OmegaConf.load(replica / ".hydra" / "overrides.yaml")]
    assert "seed=1" in overrides and "replicas=1" in overrides
    assert "training" in (replica / "run.log").read_text() or "trained" in (replica / "run.log").read_text()
    alone = run_cli(*overrides, "hydra.run.dir=alone", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert OmegaConf.load(tmp_path / "alone" / ".hydra" / "config.yaml") == config
    assert not (tmp_path / "alone" / "seed1").exists()  # one run, not a stack again


# ---------------------------------------------------------------------------------------------------------------
# a job its launcher stopped and requeued (submitit: its timeout or a preemption)

JOB = "4242"  # the submitit job id of the job and of its requeued copies


@pytest.fixture
def in_submitit_job(monkeypatch):
    """This process as submitit's local executor runs a job (the environment submitit.JobEnvironment reads)."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", JOB)


def stopped_job(folder: Path, checkpoint: bool = True, job=JOB) -> Path:
    """A job dir as a launcher's stop leaves it: status.json failed, stopped_by_launcher naming its submitit job."""
    folder.mkdir(parents=True)
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"a checkpoint")
    status = {"status": "failed", "reason": "stopped by the launcher", "pid": 2 ** 22 + 1, "stopped_by_launcher": job}
    (folder / "status.json").write_text(json.dumps(status))
    return folder


def job_config(overwrite=False, **train):
    return OmegaConf.create({"overwrite": overwrite, "replicas": 1, "train": {"resume": None, **train}})


@pytest.mark.parametrize("given", [{}, {"overwrite": True}, {"resume": "/elsewhere/checkpoint.pt"}],
                         ids=["plain", "overwrite", "another resume"])
def test_a_requeued_job_resumes_from_the_checkpoint_its_stopped_attempt_wrote(tmp_path, in_submitit_job, given):
    from cli.signals import requeued

    out, cfg = stopped_job(tmp_path / "job"), job_config(**given)
    assert "resuming from" in requeued(cfg, out)
    assert cfg.train.resume == str((out / "checkpoint.pt").absolute()) and not cfg.overwrite


def test_a_requeued_job_whose_attempt_wrote_no_checkpoint_starts_again_in_its_dir(tmp_path, in_submitit_job):
    from cli.signals import requeued

    out, cfg = stopped_job(tmp_path / "job", checkpoint=False), job_config()
    assert "starting again" in requeued(cfg, out)
    assert cfg.overwrite and cfg.train.resume is None


LAUNCH = "pid 7, started 2026-12-02T06:00:00"


def lost_joblib_job(folder: Path, checkpoint: bool, launch=LAUNCH, pid=2 ** 22 + 1) -> Path:
    """A job dir as a worker killed with its pool leaves it: status.json still running, with its launch and pid."""
    folder.mkdir(parents=True)
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"a checkpoint")
    (folder / "status.json").write_text(json.dumps({"status": "running", "pid": pid, "launch": launch}))
    return folder


@pytest.mark.parametrize("checkpoint, then", [(True, "resuming from"), (False, "starting again")])
def test_a_job_of_this_launch_lost_with_its_worker_is_rerun_from_its_checkpoint_or_afresh(tmp_path, monkeypatch,
                                                                                           checkpoint, then):
    import cli.rundirs
    from cli.signals import requeued

    monkeypatch.setattr(cli.rundirs, "_launch", lambda: LAUNCH)
    out, cfg = lost_joblib_job(tmp_path / "job", checkpoint), job_config()
    assert requeued(cfg, out) == f"relaunched after its joblib worker was lost: {then}" + (
        f" {(out / 'checkpoint.pt').absolute()}" if checkpoint else "")
    assert bool(cfg.train.resume) == checkpoint and cfg.overwrite == (not checkpoint)


@pytest.mark.parametrize("case", ["an earlier launch", "still running", "ended"])
def test_a_job_dir_that_is_not_this_launchs_lost_job_is_left_as_it_is(tmp_path, monkeypatch, case):
    import cli.rundirs
    from cli.signals import requeued

    monkeypatch.setattr(cli.rundirs, "_launch", lambda: LAUNCH)
    alive = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline() == "up\n"  # the interpreter runs (while it execs, its cmdline is empty)
        out = lost_joblib_job(tmp_path / "job", True, launch="pid 3, started 2026-12-01T06:00:00"
                              if case == "an earlier launch" else LAUNCH,
                              pid=alive.pid if case == "still running" else 2 ** 22 + 1)
        if case == "ended":
            (out / "status.json").write_text(json.dumps({"status": "ok", "launch": LAUNCH}))
        cfg = job_config()
        assert requeued(cfg, out) == "" and cfg.train.resume is None and not cfg.overwrite
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("case", ["another submitit job", "not stopped by a launcher", "not in a submitit job"])
def test_a_job_is_resumed_only_where_the_launcher_stopped_this_same_job(tmp_path, monkeypatch, case):
    from cli.signals import requeued

    if case != "not in a submitit job":
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
        monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", JOB)
    else:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    out = stopped_job(tmp_path / "job", job="999" if case == "another submitit job" else JOB)
    if case == "not stopped by a launcher":
        (out / "status.json").write_text(json.dumps({"status": "failed", "reason": "crashed", "pid": 2 ** 22 + 1}))
    cfg = job_config()
    before = OmegaConf.to_yaml(cfg)
    assert requeued(cfg, out) == "" and OmegaConf.to_yaml(cfg) == before


def test_a_folder_holding_a_sweeps_job_dirs_or_an_optuna_result_holds_a_sweep(tmp_path):
    from cli.sweep import holds_sweep

    assert not holds_sweep(tmp_path)
    (tmp_path / "optimization_results.yaml").write_text("name: optuna\n")
    assert holds_sweep(tmp_path)
    other = tmp_path / "other"
    (other / "job0" / ".hydra").mkdir(parents=True)
    (other / "job0" / "status.json").write_text("{}")
    assert not holds_sweep(other)  # a lone run: not a sweep
    (other / "job0" / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    assert holds_sweep(other)


def test_a_failed_job_returns_nan_to_a_sweeper_outside_optuna():
    import math

    from cli.rundirs import failed_value

    assert math.isnan(failed_value())


@pytest.mark.slow  # a job past submitit's 1-minute timeout_min and its requeue, then the same job uninterrupted
def test_a_job_submitit_stops_at_its_timeout_is_requeued_and_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # 150000 steps: past the timeout on the fastest machine measured (40000 steps of this job took 13.9 s there, and
    # finished before submitit's signal)
    job = ["model=vae", "data.n=5", "seed=0", "train.steps=150000", "eval.samples=10000", "eval.replicates=4",
           "eval.figures=false"]
    stopped = run_cli("-m", *job, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=1",
                      "hydra.sweep.dir=stopped", cwd=tmp_path, timeout=600)
    assert stopped.returncode == 0, stopped.stderr
    (folder,) = [p.parent for p in (tmp_path / "stopped").glob("*/status.json")]
    log = (folder / "run.log").read_text()
    assert "requeued by the launcher (job " in log and "): resuming from " in log
    plain = run_cli("-m", *job, "hydra.sweep.dir=plain", cwd=tmp_path, timeout=600)
    assert plain.returncode == 0, plain.stderr
    (other,) = [p.parent for p in (tmp_path / "plain").glob("*/status.json")]
    loss = [json.loads((d / "metrics.json").read_text())["loss"] for d in (folder, other)]
    assert loss[0] == loss[1]


def test_a_submitit_job_lost_without_a_result_is_a_nan_result_after_the_others(monkeypatch):
    core = pytest.importorskip("submitit.core.core")
    from submitit.core import utils

    from cli.launcher import tolerate_lost_jobs

    def lost(job):
        raise utils.UncompletedJobError("Job 123 has not produced any output (state: FAILED)")

    monkeypatch.setattr(core.Job, "results", lost)
    tolerate_lost_jobs()
    (ret,) = core.Job.results(object())
    assert ret.status.name == "COMPLETED" and ret.return_value != ret.return_value  # nan


def test_a_sweeps_workers_are_all_its_descendants_so_a_launchers_grandchild_jobs_are_stopped_too():
    from cli.signals import _children

    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
            "time.sleep(30)")
    child, grandchildren = subprocess.Popen([sys.executable, "-c", code]), []
    try:
        def parent(pid):
            try:
                return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                return None

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not grandchildren:
            time.sleep(0.1)
            found = _children()
            grandchildren = [p for p in found if p != child.pid and parent(p) == child.pid]
    finally:
        for p in [*grandchildren, child.pid]:
            with __import__("contextlib").suppress(OSError):
                os.kill(p, signal.SIGKILL)
        child.wait()
    assert child.pid in found and len(grandchildren) == 1


def test_a_stopped_job_says_what_its_requeued_job_will_do(tmp_path):
    from cli.signals import stopped_reason

    assert "starts it again (no checkpoint.pt yet)" in stopped_reason(SystemExit(144), tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"a checkpoint")
    assert "resumes from checkpoint.pt" in stopped_reason(SystemExit(144), tmp_path)
    assert "a replica group does not resume" in stopped_reason(SystemExit(144), tmp_path, replicas=3)


def test_a_lost_submitit_job_returns_what_the_sweeper_takes_for_a_failed_job(monkeypatch):
    core = pytest.importorskip("submitit.core.core")
    from submitit.core import utils

    from cli.launcher import tolerate_lost_jobs
    from cli.rundirs import failed_value

    def lost(job):
        raise utils.UncompletedJobError("Job 123 has not produced any output (state: FAILED)")

    monkeypatch.setattr(core.Job, "results", lost)
    tolerate_lost_jobs(failed_value("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"))
    (ret,) = core.Job.results(object())
    assert ret.return_value is None  # optuna refuses nan; None fails the trial


def test_a_sweep_whose_values_resolve_only_inside_a_job_is_left_to_its_jobs():
    from cli.sweep import check_some_job_runs

    resume = "train.resume=${hydra:runtime.output_dir}/checkpoint.pt"
    check_some_job_runs([["seed=0", resume], ["seed=1", resume]])  # no ConfigError: each job resolves it


def test_a_bad_value_in_every_job_is_refused_naming_the_first_jobs_reason():
    from cli.state import ConfigError
    from cli.sweep import check_some_job_runs

    with pytest.raises(ConfigError, match=r"^train.steps=-1 is not allowed: .*every one of the sweep's 2 jobs"):
        check_some_job_runs([["train.steps=-1"], ["train.steps=0"]])


@pytest.mark.parametrize("env, job", [({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242"}, "4242"),
                                      ({"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "81"}, "81"),
                                      ({"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "81", "SLURM_ARRAY_JOB_ID": "7",
                                        "SLURM_ARRAY_TASK_ID": "3"}, "7_3"),
                                      ({}, "")], ids=["local", "slurm", "slurm array", "no launcher"])
def test_a_submitit_job_is_known_by_the_id_submitit_gives_it(monkeypatch, env, job):
    from cli.signals import launcher_job

    for key in ("SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_JOB_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
                "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launcher_job() == job


def joblib_sweep_killing_seed_1(tmp_path, once: bool, sig: int = 9):
    """A joblib sweep (2 workers) of seeds 0, 1, 2 whose seed 1 sends `sig` to its own worker as it builds its
    objective (SIGKILL: as the out-of-memory killer would), every time or (once) on its first try only; (process,
    {seed: status})."""
    import zygote

    folder = tmp_path / "hook"
    folder.mkdir()
    mark = tmp_path / "killed_once"
    (folder / "sitecustomize.py").write_text(
        "import os, pathlib, cli.build\n"
        "_build = cli.build.build_objective\n"
        "def build_objective(cfg):\n"
        f"    mark = pathlib.Path({str(mark)!r})\n"
        f"    if cfg.seed == 1 and not ({once} and mark.exists()):\n"
        "        mark.touch()\n"
        f"        os.kill(os.getpid(), {sig})\n"
        "    return _build(cfg)\n"
        "cli.build.build_objective = build_objective\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{folder}{os.pathsep}{ROOT}")
    sweep = tmp_path / "sweep"
    proc = zygote.run([sys.executable, str(ROOT / "run.py"), "-m", "data.n=3", "train.steps=50", "eval.figures=false",
                       "eval.samples=10000", "eval.replicates=4", "seed=0,1,2", "hydra/launcher=joblib",
                       "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"],
                      cwd=tmp_path, env=env, timeout=600, fresh=True)
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc, {next(x for x in p.name.split(",") if x.startswith("seed=")):
                  json.loads((p / "status.json").read_text())["status"]
                  for p in sweep.iterdir() if (p / "status.json").exists()}


def test_a_joblib_sweep_outlives_a_worker_killed_by_sigkill(tmp_path):
    """A worker lost to SIGKILL makes loky end the whole pool: the jobs not started yet still run, and the jobs that
    were running run again, each alone, so a job lost beside the one that killed its worker ends ok; a job that
    kills its worker again is listed as killed (cli/joblib_launch.py)."""
    proc, status = joblib_sweep_killing_seed_1(tmp_path, once=False)
    assert proc.returncode == 1, proc.stderr
    assert "a joblib worker died (exit codes {SIGKILL(-9)})" in proc.stdout + proc.stderr
    assert status == {"seed=0": "ok", "seed=1": "running", "seed=2": "ok"}
    assert "seed=1,train.steps=50: failed: killed" in proc.stderr
    assert "lost its worker again, alone" in proc.stdout + proc.stderr


@pytest.mark.slow  # 37 s (two loky pools), kept out of the default suite's time
def test_sigterm_to_one_joblib_worker_stops_its_job_and_the_sweep_goes_on(tmp_path):
    """kill <worker pid>: that job is recorded as killed by SIGTERM, and the other jobs run to their end (it ended the
    whole sweep, as if interrupted by SIGINT, with the job not started yet missing)."""
    proc, status = joblib_sweep_killing_seed_1(tmp_path, once=False, sig=15)
    assert proc.returncode == 1, proc.stderr
    assert status == {"seed=0": "ok", "seed=1": "failed", "seed=2": "ok"}
    assert "seed=1,train.steps=50: failed: killed by SIGTERM" in proc.stderr and "interrupted" not in proc.stderr


@pytest.mark.slow
def test_a_job_lost_with_its_worker_runs_again_and_the_sweep_ends_ok(tmp_path):
    proc, status = joblib_sweep_killing_seed_1(tmp_path, once=True)
    assert proc.returncode == 0, proc.stderr
    assert status == {"seed=0": "ok", "seed=1": "ok", "seed=2": "ok"}


def test_after_a_lost_worker_an_earlier_launchs_job_dir_is_no_sign_of_this_launchs_job(tmp_path):
    """A relaunch with overwrite=true into the same sweep dir: a job not started yet when a worker died still has
    the earlier launch's status.json, and is relaunched, not taken for ended (cli/joblib_launch.job_state)."""
    from omegaconf import open_dict

    from analysis.rundir import write_status
    from cli.joblib_launch import job_state
    from cli.keys import compose_config

    sweep = tmp_path / "sweep"
    cfg = compose_config(["seed=0", f"hydra.sweep.dir={sweep}"], hydra_cfg=True)
    with open_dict(cfg):
        cfg.hydra.job.override_dirname = "seed=0"
    folder = sweep / "seed=0"
    folder.mkdir(parents=True)
    (sweep / ".sweep.lock").write_text("pid 2, started 2026-12-02T10:00:00\n")
    write_status(folder, "ok", "finished", launch="pid 1, started 2026-12-02T09:00:00", loss=1.0)
    assert job_state(cfg, ["seed=0"], 0, float("nan"))[0] == "unstarted"
    write_status(folder, "ok", "finished", launch="pid 2, started 2026-12-02T10:00:00", loss=1.0)
    assert job_state(cfg, ["seed=0"], 0, float("nan"))[0] == "ended"


def test_a_sweep_that_stops_its_workers_marks_itself_stopping_first(tmp_path, monkeypatch):
    """Its workers then read their SIGTERM as the sweep's end, not as one job's (a worker that took it for its own
    job's went on to start the next job while the sweep stopped)."""
    from cli import signals
    from cli.state import STATE

    monkeypatch.setitem(STATE, "sweep_dir", tmp_path)
    monkeypatch.setitem(STATE, "worker", False)
    monkeypatch.setattr(signals, "_children", lambda: [])
    assert not signals.sweep_stopping(tmp_path)
    signals.stop_workers(grace=0)
    assert signals.sweep_stopping(tmp_path)


def test_a_new_launch_clears_a_stopping_mark_an_earlier_one_left(tmp_path, monkeypatch):
    from cli.signals import STOPPING, sweep_stopping
    from cli.state import STATE
    from cli.sweep import claim_sweep

    monkeypatch.setitem(STATE, "sweep_lock", None)
    monkeypatch.setitem(STATE, "sweep_undo", None)  # claim_sweep sets both: put back after the test
    (tmp_path / STOPPING).touch()  # the earlier launch was killed while it stopped its workers
    claim_sweep(tmp_path, overwrite=True)
    try:
        assert not sweep_stopping(tmp_path)
    finally:
        STATE["sweep_undo"]()


@pytest.mark.parametrize("overrides, why", [
    ([], "no override of the job names it"),  # it said "outside <sweep dir> ('..' leaves it)"
    (["eval.figures=false", "overwrite=true"], "no override of the job names it"),
    (["hydra.sweep.subdir=."], "hydra.sweep.subdir is '.'"),
], ids=["bare", "left_out_keys", "dot"])
def test_a_sweep_whose_job_dir_would_be_the_sweep_dir_itself_is_refused_saying_so(tmp_path, overrides, why):
    proc = run_cli("-m", *overrides, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    one_line_error(proc, "would be the sweep dir", "itself", why, "hydra.sweep.subdir=${hydra:job.num}")
    assert "leaves it" not in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize("pair", [["train.steps=20", "train.steps=interval(10,20)"],
                                  ["train.steps=interval(10,20)", "train.steps=20"]], ids=["value_first", "sweep_first"])
def test_an_optuna_sweep_that_gives_a_key_as_one_value_and_swept_is_refused_before_any_trial(tmp_path, pair):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # optuna kept train.steps=20 whatever the order: it searched nothing, exit 0
    proc = run_cli("-m", "data.n=3", "eval.figures=false", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", *pair,
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    one_line_error(proc, "train.steps is given twice in this optuna sweep", "give train.steps once")
    assert not list(tmp_path.iterdir())
