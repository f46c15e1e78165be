"""The fault and bad-input catalogue of the command line: every failure is one line and a status, sweeps survive
failing jobs, results are never overwritten, mixed or mislabelled, resumes check what they resume."""
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, but, overwrite_in_member, run_cli

FAST = ["train.steps=30", "train.num_particles=8", "eval.samples=10000", "eval.replicates=4", "data.n=3",
        "optim.lr=0.02", "eval.figures=false"]


def error_lines(proc) -> list:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def one_line_error(proc, *words) -> str:
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def run_dirs(root: Path) -> list:
    return sorted(p.parent for p in root.rglob("status.json"))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# 1. a sweep survives any failing job


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"])
def test_a_sweep_runs_every_job_when_one_is_refused(tmp_path, launcher):
    proc = run_cli("-m", *but(FAST, "data.n"), "data.n=0,3", *launcher, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    statuses = {json.loads((d / "status.json").read_text())["status"]: d for d in run_dirs(tmp_path)}
    assert set(statuses) == {"ok", "refused"}
    assert (statuses["ok"] / "metrics.json").exists() and not (statuses["refused"] / "metrics.json").exists()
    summary = next(tmp_path.rglob("summary.md")).read_text()
    assert "REFUSED" in summary and "data.n=0 is not allowed" in summary
    assert [line for line in proc.stderr.splitlines() if line.startswith("failed: ")][0].endswith(
        "data.n must be an integer >= 1")


def test_a_sweep_job_that_diverges_is_recorded_and_the_others_finish(tmp_path):
    proc = run_cli("-m", *but(FAST, "optim.lr"), "optim.lr=1e30,0.02", cwd=tmp_path)
    assert proc.returncode == 1
    csv = next(tmp_path.rglob("summary.csv")).read_text()
    assert "diverged" in csv and ",ok," in csv


def test_a_refused_sweep_job_says_why_in_its_run_log(tmp_path):
    run_cli("-m", *FAST, "train.beta=-1,1", cwd=tmp_path)
    refused = [d for d in run_dirs(tmp_path) if json.loads((d / "status.json").read_text())["status"] == "refused"]
    assert len(refused) == 1 and "train.beta" in (refused[0] / "run.log").read_text()


# ---------------------------------------------------------------------------------------------------------------
# 2. divergence


@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr_final=inf", "train.beta=inf", "optim.lr=nan",
                                      "train.warmup_start=nan", "objective.free_bits=inf"])
def test_a_value_that_can_only_diverge_is_refused_up_front(tmp_path, override):
    proc = run_cli(*FAST, override, cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, override.split("=")[0])
    assert not (tmp_path / "outputs").exists()


def test_a_nan_from_the_last_update_stops_the_run_with_one_line(tmp_path):
    proc = run_cli(*FAST, "optim.lr=1e30", "train.steps=1", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "diverged")
    assert not list(tmp_path.rglob("metrics.json")) or json.loads(next(tmp_path.rglob("metrics.json")).read_text())["status"] == "diverged"


def test_a_checkpoint_is_only_written_from_finite_params(tmp_path):
    proc = run_cli(*FAST, "optim.lr=1e30", "train.steps=200", "train.checkpoint_every=50", "train.log_every=100",
                   cwd=tmp_path)
    assert proc.returncode == 2
    for path in tmp_path.rglob("checkpoint.pt"):
        state = torch.load(path, weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["params"].values())


def test_a_finite_divergence_is_marked_and_returns_no_normal_number(tmp_path):
    proc = run_cli("optim.lr=1000", "train.steps=300", "eval.figures=false", "train.num_particles=8",
                   "data.n=1000", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "diverged", "optim.lr")
    (folder,) = run_dirs(tmp_path)
    assert json.loads((folder / "status.json").read_text())["status"] == "diverged"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["loss"] is None


@pytest.mark.parametrize("status_too", [False, True], ids=["outputs", "outputs_and_status"])
def test_a_full_disk_after_training_is_one_line_and_keeps_what_was_written(tmp_path, status_too):
    """encodings.nc, and with status_too every status.json after the claim's, fail with ENOSPC (a full disk): the
    run dir was deleted (its checkpoint too) after HDF5's tracebacks, and the process could segfault at exit."""
    import zygote

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, analysis.encodings, analysis.rundir, analysis.claim\n"
        "def full(*args, **kwargs):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "analysis.encodings.save = full\n"
        f"if {status_too}:\n"
        "    _write = analysis.rundir.write_status\n"
        "    def write_status(path, status, *args, **kwargs):\n"
        "        return _write(path, status, *args, **kwargs) if status == 'running' else full()\n"
        "    analysis.claim.write_status = write_status\n")
    run = tmp_path / "run"
    proc = zygote.run([sys.executable, str(ROOT / "run.py"), *FAST, f"hydra.run.dir={run}"], cwd=tmp_path,
                      env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{hook}{os.pathsep}{ROOT}"),
                      timeout=300, fresh=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = one_line_error(proc, "cannot write the run's outputs", "No space left on device")
    assert ("its status.json could not be written" in line) == status_too
    assert {"checkpoint.pt", "history.csv", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "status.json").read_text())["status"] == ("running" if status_too else "failed")


def test_an_overwrite_that_diverges_keeps_the_finished_run_it_replaced(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "status.json").write_text(json.dumps({"status": "ok", "reason": "finished"}))
    (folder / "metrics.json").write_text('{"loss": 0.7}')
    proc = run_cli("optim.lr=1000", "train.steps=300", "eval.figures=false", "train.num_particles=8",
                   "data.n=1000", "overwrite=true", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "diverged", "the run it replaced is kept in")
    (backup,) = folder.glob(".replaced.*")
    assert json.loads((backup / "metrics.json").read_text()) == {"loss": 0.7}
    assert json.loads((folder / "status.json").read_text())["replaced_run"].startswith("the run this one replaced")


# ---------------------------------------------------------------------------------------------------------------
# 3. results are never overwritten, mixed or mislabelled


def test_runs_started_together_get_their_own_dirs_named_for_the_guide(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "run.py"), *FAST], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2 and all("_vae_gaussian_n3_s0" in d.name for d in dirs)


def test_the_last_line_of_a_run_names_its_output_dir(tmp_path):
    proc = run_cli(*FAST, cwd=tmp_path)
    (folder,) = run_dirs(tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == f"outputs: {folder}"


def test_a_run_refuses_a_dir_that_holds_a_finished_run_and_changes_nothing_there(tmp_path):
    run_cli(*FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    before = snapshot(tmp_path / "run")
    proc = run_cli(*FAST, "seed=1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "already holds", "overwrite=true")
    assert snapshot(tmp_path / "run") == before


def test_overwrite_true_replaces_a_finished_run(tmp_path):
    run_cli(*FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    proc = run_cli(*FAST, "seed=1", "overwrite=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run/metrics.json").read_text())["seed"] == 1
    assert "seed: 1" in (tmp_path / "run/.hydra/config.yaml").read_text()


@pytest.mark.parametrize("override", ["data.n=0", "model=dlgm guide=gaussian", "+foo=1",
                                      "data.n=1000000 train.num_particles=32"])
def test_a_refused_run_leaves_no_trace_in_outputs(tmp_path, override):
    proc = run_cli(*FAST, *override.split(), cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc)
    assert not (tmp_path / "outputs").exists()


def test_a_refused_run_changes_nothing_in_an_existing_dir(tmp_path):
    run_cli(*FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    before = snapshot(tmp_path / "run")
    proc = run_cli(*FAST, "data.n=0", "overwrite=true", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and snapshot(tmp_path / "run") == before


# ---------------------------------------------------------------------------------------------------------------
# 4. resume checks what it resumes


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    proc = run_cli(*FAST, "train.steps=40", f"hydra.run.dir={folder / 'run'}", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder / "run" / "checkpoint.pt"


def test_the_checkpoint_carries_the_config_that_produced_it(finished):
    config = torch.load(finished, weights_only=False)["config"]
    assert config["data"]["n"] == 3 and config["seed"] == 0 and config["train.steps"] == 40


@pytest.mark.parametrize("override, key", [("seed=7", "seed"), ("data.n=10", "data.n"), ("model=dlgm", "model"),
                                           ("guide=flow", "guide"), ("optim.lr=0.01", "optim.lr"),
                                           ("train.num_particles=16", "train.num_particles"),
                                           ("train.beta=0.5", "train.beta"),
                                           ("train.average=0.5", "train.average"),
                                           ("train.log_every=10", "train.log_every")])
def test_a_resume_that_changes_the_trajectory_is_refused_naming_the_key(tmp_path, finished, override, key):
    proc = run_cli(*FAST, "train.steps=40", f"train.resume={finished}", override, cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, key)
    assert not (tmp_path / "outputs").exists()


def test_a_checkpoint_with_overwritten_tensor_bytes_is_refused_in_one_line_naming_the_member(tmp_path, finished):
    import shutil

    shutil.copy(finished, tmp_path / "bad.pt")
    member = overwrite_in_member(tmp_path / "bad.pt")
    proc = run_cli(*FAST, "train.steps=60", f"train.resume={tmp_path / 'bad.pt'}", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, f"train.resume={tmp_path / 'bad.pt'} is damaged", f"its member {member} ")
    assert not (tmp_path / "outputs").exists()


def test_a_checkpoint_whose_history_lacks_a_logged_row_is_refused_in_one_line_before_training(tmp_path):
    proc = run_cli(*FAST, "train.steps=40", "train.log_every=10", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    state["history"] = state["history"][:1]  # the step-10 row of four
    torch.save(state, tmp_path / "gap.pt")
    proc = run_cli(*FAST, "train.steps=60", "train.log_every=10", f"train.resume={tmp_path / 'gap.pt'}",
                   f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, f"train.resume={tmp_path / 'gap.pt'}: its history entry has no row at step 20")
    assert not (tmp_path / "again").exists()


def test_a_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path, finished):
    proc = run_cli(*FAST, "train.steps=20", f"train.resume={finished}", cwd=tmp_path)
    one_line_error(proc, "train.steps")


def test_a_resume_may_extend_the_step_budget(tmp_path, finished):
    proc = run_cli(*FAST, "train.steps=60", f"train.resume={finished}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (folder,) = run_dirs(tmp_path)
    assert json.loads((folder / "metrics.json").read_text())["steps"] == 60


def test_a_resumed_finished_run_writes_a_checkpoint_and_names_the_engine_that_trained_it(tmp_path, finished):
    proc = run_cli(*FAST, "train.steps=40", f"train.resume={finished}", f"hydra.run.dir={tmp_path / 'again'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(tmp_path / "again" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 40 and state["history"] == torch.load(finished, weights_only=False)["history"]
    engine = json.loads((finished.parent / "metrics.json").read_text())["engine"]
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["engine"] == state["engine"] == engine


def test_a_resume_with_another_step_budget_says_in_its_metrics_that_the_lr_schedule_changed(tmp_path, finished):
    proc = run_cli(*FAST, "train.steps=60", f"train.resume={finished}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (folder,) = run_dirs(tmp_path)
    resumed = json.loads((folder / "metrics.json").read_text())["resumed"]
    assert resumed["step"] == 40 and resumed["checkpoint_steps"] == 40
    assert "40-step run" in resumed["schedule_changed"] and "60-step run" in resumed["schedule_changed"]
    assert "lr schedule" in proc.stdout + proc.stderr


def _timing_free(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("wall_seconds", "eval_seconds")}


def kill_and_resume(tmp_path, args, at_step):
    """Run args uninterrupted; run them again, kill -9 once the checkpoint of `at_step` appears, and resume it."""
    whole = tmp_path / "whole"
    assert run_cli(*args, f"hydra.run.dir={whole}", cwd=tmp_path).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, f"hydra.run.dir={killed}"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = tmp_path / "at_kill.pt"
    while proc.poll() is None and not (killed / "checkpoint.pt").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (killed / "checkpoint.pt").rename(saved)
    step = torch.load(saved, weights_only=False)["step"]
    if step != at_step:
        pytest.skip(f"the run reached step {step} before it was killed")
    resumed = tmp_path / "resumed"
    proc = run_cli(*args, f"train.resume={saved}", f"hydra.run.dir={resumed}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return whole, resumed


def test_an_exact_likelihood_run_killed_in_its_guide_phase_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path):
    # objective=exact: the model phase, then the guide against the frozen model; the guide phase's checkpoint holds
    # the model and what its phase recorded, so a resume (by hand, or a requeued or relaunched sweep job) goes on
    args = ["data.n=5", "objective=exact", "objective.steps.vae=100", "train.steps=400", "train.checkpoint_every=200",
            "train.num_particles=16", "eval.samples=10000", "eval.replicates=4", "eval.figures=false"]
    whole, resumed = kill_and_resume(tmp_path, args, 200)
    assert (whole / "history.csv").read_bytes() == (resumed / "history.csv").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, resumed))
    for metrics in (a, b):
        metrics["model_phase"].pop("wall_seconds")  # the killed run's model phase, timed again by no one
    assert _timing_free(a) == _timing_free(b)


@pytest.mark.parametrize("log_every", [pytest.param(100, marks=pytest.mark.slow), 300])  # 300: the kill falls
def test_kill_and_resume_reproduce_an_uninterrupted_run_byte_for_byte(tmp_path, log_every):  # inside a log window
    args = ["data.n=100", "train.steps=1000", "train.checkpoint_every=500", f"train.log_every={log_every}",
            "eval.samples=10000", "eval.replicates=4", "eval.figures=false"]
    whole, resumed = kill_and_resume(tmp_path, args, 500)
    assert (whole / "history.csv").read_bytes() == (resumed / "history.csv").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, resumed))
    assert _timing_free(a) == _timing_free(b)


def test_kill_and_resume_inside_the_averaging_window_reproduce_an_uninterrupted_run_byte_for_byte(tmp_path):
    """The checkpoint at step 500 lies inside the window of the last 600 steps: it carries the running mean."""
    args = ["data.n=100", "train.steps=1000", "train.checkpoint_every=500", "train.average=0.6",
            "eval.samples=10000", "eval.replicates=4", "eval.figures=false"]
    whole, resumed = kill_and_resume(tmp_path, args, 500)
    assert torch.load(resumed.parent / "at_kill.pt", weights_only=False)["average"]["count"] == 100
    assert (whole / "history.csv").read_bytes() == (resumed / "history.csv").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, resumed))
    assert _timing_free(a) == _timing_free(b)


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [100, 300])
def test_kill_and_resume_reproduce_an_uninterrupted_dlgm_run_byte_for_byte(tmp_path, log_every):
    args = ["model=dlgm", "data.n=1000", "train.steps=1000", "train.checkpoint_every=500",
            f"train.log_every={log_every}", "eval.figures=false"]
    whole, resumed = kill_and_resume(tmp_path, args, 500)
    assert (whole / "history.csv").read_bytes() == (resumed / "history.csv").read_bytes()
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, resumed))
    assert _timing_free(a) == _timing_free(b)


# ---------------------------------------------------------------------------------------------------------------
# 5. memory


def test_a_run_too_large_for_memory_is_refused_up_front_saying_what_fits(tmp_path):
    proc = run_cli("data.n=1000000", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "data.n", "memory_gb", "fits data.n <=")


def test_the_checkpoint_is_written_before_evaluation(tmp_path, monkeypatch):
    import run as entry
    from analysis import report
    from test_cli import compose_config

    seen = []
    real = report.evaluate_run
    monkeypatch.setattr(report, "evaluate_run",
                        lambda *a, **k: seen.append((tmp_path / "run" / "checkpoint.pt").exists()) or real(*a, **k))
    entry.run(compose_config(*FAST), tmp_path / "run")
    assert seen == [True]


# ---------------------------------------------------------------------------------------------------------------
# 6. unknown keys and Hydra's own errors


@pytest.mark.parametrize("override, key, hint", [
    ("+foo=1", "foo", ""), ("+train.step=100", "train.step", "train.steps"), ("data.nn=3", "data.nn", "data.n"),
    ("lr=1e-3", "lr", "optim.lr"), ("model.depth=1", "model.depth", "model=dlgm"),
    ("++train.stepz=3", "train.stepz", "train.steps"), ("eval.sample=10000", "eval.sample", "eval.samples"),
])
def test_an_unknown_key_is_refused_naming_the_closest_known_keys(tmp_path, override, key, hint):
    proc = run_cli(*FAST, override, cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, key, hint)
    assert not (tmp_path / "outputs").exists()


def test_an_unknown_key_in_a_multirun_refuses_the_whole_sweep(tmp_path):
    proc = run_cli("-m", *but(FAST, "data.n"), "data.n=1,3", "+train.step=5", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "train.step")
    assert not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("override", ["data.n=[1,2", "model=", "data.n=1,2"])
def test_a_malformed_command_line_is_one_line(tmp_path, override):
    proc = run_cli(*FAST, override, cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc)


def test_an_output_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli(*FAST, f"hydra.run.dir={tmp_path / 'file' / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "output dir")
    assert (tmp_path / "file").read_text() == "x"


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli(*FAST, f"hydra.run.dir={tmp_path / 'file'}", cwd=tmp_path)
    assert proc.returncode == 2
    one_line_error(proc, "is a file")


def test_a_finite_blow_up_is_called_diverged_naming_the_first_logged_step_above_the_no_latent_loss():
    from types import SimpleNamespace

    from cli.guards import divergence
    from models import OneBit

    history = [{"step": 1, "objective": 3.6, "loss": 3.6}, {"step": 2, "objective": 2.2e13, "loss": 2.2e13},
               {"step": 3, "objective": 2.2e10, "loss": 2.2e10}]
    reason = divergence(SimpleNamespace(history=history, initial_loss=3.61), OneBit(5))
    assert reason.startswith("training diverged: the final objective 2.2e+10 is above the no-latent loss")
    assert "first went above them at step 2 (2.2e+13)" in reason and "\n" not in reason


def test_a_job_refused_while_overwriting_a_finished_sweep_keeps_that_run_as_it_was_and_is_listed_refused(tmp_path):
    by_number = "hydra.sweep.subdir=${hydra.job.num}"  # job dirs named by job number: job 0 maps onto job 0's dir
    first = run_cli("-m", *FAST, "seed=0,1", by_number, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    job = tmp_path / "sweep" / "0"
    before = snapshot(job)
    # job 0 is refused there (job 1 runs: a sweep whose every job is refused is refused before it starts)
    again = run_cli("-m", *FAST, "seed=0", "train.progress=bogus,false", by_number, "overwrite=true",
                    "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert again.returncode == 1, again.stderr  # a sweep with a job that did not end well
    assert snapshot(job) == before
    md = (tmp_path / "sweep" / "summary.md").read_text()
    assert "REFUSED" in md and "train.progress='bogus' is not allowed" in md and "is kept as it was" in md


def test_a_killed_sweep_job_resumed_in_place_stays_a_job_of_its_sweep(tmp_path):
    first = run_cli("-m", *FAST, "seed=0,1", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    job = next(p for p in (tmp_path / "sweep").iterdir() if "seed=1" in p.name)
    (job / "status.json").write_text(json.dumps({"status": "running", "pid": 999999}))  # as SIGKILL leaves it
    for name in ("metrics.json", "history.csv", "encodings.nc"):
        (job / name).unlink()
    resumed = run_cli(*FAST, "seed=1", f"train.resume='{job / 'checkpoint.pt'}'", f"hydra.run.dir='{job}'",
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    from analysis.sweep import summarize

    result = summarize(tmp_path / "sweep", figures=False)
    assert len(result["jobs"]) == 2 and not result["failed"] and not result["missing"] and not result["left_out"]
    assert (job / ".hydra" / "resume_overrides.yaml").exists()


def test_a_killed_sweep_job_resumed_in_place_with_another_config_is_refused_and_left_as_it_was(tmp_path):
    first = run_cli("-m", *FAST, "seed=0,1", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    job = next(p for p in (tmp_path / "sweep").iterdir() if "seed=1" in p.name)
    (job / "status.json").write_text(json.dumps({"status": "running", "pid": 999999}))  # as SIGKILL leaves it
    before = snapshot(job)
    steps = next(int(a.split("=")[1]) for a in FAST if a.startswith("train.steps="))
    resumed = run_cli(*FAST, "seed=1", f"train.steps={2 * steps}", f"train.resume='{job / 'checkpoint.pt'}'",
                      f"hydra.run.dir='{job}'", cwd=tmp_path)
    assert resumed.returncode == 2 and resumed.stderr.startswith(f"error: train.steps={2 * steps} is not allowed in "
                                                                 f"place: the sweep job in {job} ran with "
                                                                 f"train.steps={steps}"), resumed.stderr
    assert snapshot(job) == before


def test_a_sweep_jobs_error_reaches_the_console_once_and_its_run_log():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        proc = run_cli("-m", *FAST, "optim.lr=1e6", "seed=0", "hydra.sweep.dir=sweep", cwd=Path(tmp))
        lines = (proc.stdout + proc.stderr).splitlines()
        assert sum(line.startswith("error: training diverged") for line in lines) == 1
        assert not any(line.startswith("training diverged") for line in lines)  # the bare copy the log printed
        log = next(Path(tmp, "sweep").glob("*/run.log")).read_text()
        assert "[ERROR] training diverged" in log


def test_an_iwae_trained_run_is_judged_by_its_own_bound_not_by_its_poorer_elbo():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from cli.guards import divergence
    from models import OneBit

    history = [{"step": 300, "objective": 0.988, "loss": 0.988}]
    result = SimpleNamespace(history=history, initial_loss=3.49)
    elbo_of_an_iwae_guide = {"loss": 12.17, "kl": {"z": 11.2}, "loss_estimator": "exact"}
    assert divergence(result, OneBit(5), final=elbo_of_an_iwae_guide,
                      cfg=OmegaConf.create({"objective": {"name": "iwae"}})) == ""
    assert "the final objective [exact] 12.17 is above" in divergence(
        result, OneBit(5), final=elbo_of_an_iwae_guide, cfg=OmegaConf.create({"objective": {"name": "elbo"}}))


def test_a_run_judged_diverged_after_its_evaluation_has_no_normal_looking_loss(tmp_path):
    proc = run_cli("model=vae", "guide=mixture", "objective=closed_form", "data.n=2", "train.steps=30",
                   "train.num_particles=8", "eval.samples=10000", "eval.replicates=4", "eval.figures=false",
                   "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["loss"] is None
    assert metrics["loss_judged_diverged"] > 2 * math.log(2)  # the number it was judged by, named as such
