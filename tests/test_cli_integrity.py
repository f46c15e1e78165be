"""The command line refuses bad input in one line before it claims a directory, never loses a run that was there,
and a diverged run leaves what README says (review s6/cli findings 1-16)."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli

TINY = ["data.n=3", "train.steps=20", "train.num_particles=8", "eval.samples=10000", "eval.replicates=4",
        "eval.figures=false"]


def one_line_error(proc, *words):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished single run (status ok) to refuse things against; tests copy it before touching it."""
    base = tmp_path_factory.mktemp("finished")
    proc = run_cli(*TINY, f"hydra.run.dir={base / 'run'}", cwd=base)
    assert proc.returncode == 0, proc.stderr
    return base / "run"


def copy_of(run: Path, where: Path) -> Path:
    import shutil

    target = where / "run"
    shutil.copytree(run, target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# refused in one line (exit 2) before anything is created


REFUSED = [
    (["seed=null"], ["seed=None", "an integer in [0,"]),
    (["threads=null"], ["threads=None", "an integer >= 1"]),
    (["replicas=2", "seed=4294967295"], ["seed=4294967295", "replicas=2", "seed must be <= 4294967294"]),
    (["eval.samples=10001"], ["eval.samples=10001", "eval.replicates=4"]),
    (["model._target_=os.getcwd"], ["model._target_ cannot be overridden"]),
    (["guide._convert_=all"], ["guide._convert_ cannot be overridden"]),
    (["model.name=a/b"], ["model.name cannot be overridden", "model=<one of dlgm, vae>"]),
    (["+experiment=study"], ["experiment=study sweeps model: add -m"]),  # TINY sets data.n, not model
    (["=5"], ["'=5' is not an override", "key=value"]),
    (["~model"], ["model needs an option", "dlgm, vae"]),
    (["model=null"], ["model needs an option", "dlgm, vae"]),
    (["pair=vae_flow", "model=dlgm"], ["pair=vae_flow chooses model=vae", "model=dlgm"]),
    (["--foo"], ["--foo is not an option of run.py"]),
    (["-x"], ["-x is not an option of run.py"]),
    (["--cfg", "job", "foo=1"], ["foo is not a config key"]),
    (["--info", "model=foo"], ["model=foo is not allowed"]),
    (["--cfg"], ["--cfg must be followed by job, hydra or all"]),
    (["hydra.run.dir="], ["hydra.run.dir=''", "must name a directory"]),
    (["data.n=100000000000"], ["data.n=100000000000 needs about", "memory_gb=2", "lower data.n"]),
]


@pytest.mark.parametrize("args, words", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_input_is_refused_in_one_line_and_leaves_nothing(tmp_path, args, words):
    proc = run_cli(*TINY, *args, cwd=tmp_path)
    one_line_error(proc, *words)
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_unavailable_device_is_refused_before_the_claim_of_an_in_place_resume(tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    proc = run_cli(*TINY, "train.steps=40", f"train.resume={run / 'checkpoint.pt'}", f"hydra.run.dir={run}",
                   "device=cuda", cwd=tmp_path)
    one_line_error(proc, "device='cuda' is not available")
    assert snapshot(run) == before


def test_a_resume_directory_is_named_as_one(tmp_path):
    proc = run_cli(*TINY, f"train.resume={tmp_path}", cwd=tmp_path)
    one_line_error(proc, "train.resume", "is a directory")


@pytest.mark.slow  # an end-to-end CLI run: the default suite stays under 10 minutes
def test_hydras_print_flags_still_print(tmp_path):
    for flags in (["--cfg", "job"], ["--info", "defaults"], ["--help"]):
        proc = run_cli(*flags, "data.n=3", cwd=tmp_path)
        assert proc.returncode == 0 and proc.stdout and not proc.stderr.strip(), proc.stderr
    assert "n: 3" in run_cli("--cfg", "job", "data.n=3", cwd=tmp_path).stdout


# ---------------------------------------------------------------------------------------------------------------
# a refused run never loses the run that was in its directory (findings 1, 2, 3)


def _killed(run: Path) -> Path:
    """The run as a killed one leaves it (status failed): what an in-place resume is for."""
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "status": "failed", "reason": "killed by SIGKILL"}))
    return run


def test_a_refused_in_place_resume_leaves_the_run_as_it_was(tmp_path, finished_run):
    run = _killed(copy_of(finished_run, tmp_path))
    before = {k: v for k, v in snapshot(run).items() if k != "run.log"}
    proc = run_cli(*TINY, "train.steps=40", f"train.resume={run / 'checkpoint.pt'}", f"hydra.run.dir={run}",
                   "memory_gb=0.0001", cwd=tmp_path)
    one_line_error(proc, "memory_gb=0.0001")
    assert {k: v for k, v in snapshot(run).items() if k != "run.log"} == before


def test_an_in_place_resume_of_a_finished_run_is_refused_without_overwrite(tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    proc = run_cli(*TINY, "train.steps=40", f"train.resume={run / 'checkpoint.pt'}", f"hydra.run.dir={run}",
                   cwd=tmp_path)
    one_line_error(proc, "holds a finished run (status ok): resuming it in place would replace its results")
    assert snapshot(run) == before


def test_a_refused_overwrite_keeps_the_previous_run(tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    before = {k: v for k, v in snapshot(run).items() if k != "run.log"}
    proc = run_cli(*TINY, "overwrite=true", f"hydra.run.dir={run}", "memory_gb=0.0001", cwd=tmp_path)
    one_line_error(proc, "memory_gb=0.0001")
    assert {k: v for k, v in snapshot(run).items() if k != "run.log"} == before


def test_an_overwrite_into_a_dir_without_a_run_keeps_its_files(tmp_path):
    folder = tmp_path / "foo"
    folder.mkdir()
    (folder / "precious.png").write_text("x")
    proc = run_cli(*TINY, "overwrite=true", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "precious.png").read_text() == "x"


def test_hydra_exiting_after_the_preflight_leaves_no_running_dir(tmp_path):
    import cli

    out = tmp_path / "run"

    def hydra_exits():
        assert json.loads((out / "status.json").read_text())["status"] == "running"
        raise SystemExit(2)

    argv, handler = list(sys.argv), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            cli.main(hydra_exits, ["run.py", *TINY, f"hydra.run.dir={out}"])
    finally:
        cli.STATE["claim"] = None
        sys.argv[:] = argv
        signal.signal(signal.SIGTERM, handler)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# memory, from the config


def test_the_memory_guard_counts_params_without_building_at_data_n():
    import cli
    import run

    built = []

    def build(cfg):
        built.append(cfg.data.n)
        return run.build(cfg)

    for overrides in (["data.n=37"], ["model=dlgm", "data.n=37"], ["guide=flow", "data.n=37"],
                      ["guide=mixture", "data.n=37"], ["guide=autonormal", "data.n=37"]):
        cfg = cli.keys.compose_config(overrides)
        _, model, guide = run.build(cfg)
        real = sum(p.numel() for m in (model, guide) if isinstance(m, torch.nn.Module) for p in m.parameters())
        built.clear()
        assert cli.network_params(cfg, build) == real, overrides
        assert set(built) == {1, 2}  # at n = 1 and 2 only (the spline flow twice each: on the meta device, then the CPU)
    with pytest.raises(cli.ConfigError, match="data.n=100000000000 needs"):
        cli.check_memory(cli.keys.compose_config(["data.n=100000000000"]), build)
    assert max(built) == 2


# ---------------------------------------------------------------------------------------------------------------
# divergence (finding 15)


def test_a_non_finite_divergence_writes_metrics_and_history_marked_diverged(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*TINY, "optim.lr=1e30", f"hydra.run.dir={out}", cwd=tmp_path)
    one_line_error(proc, "diverged", "optim.lr")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["loss"] is None and "checkpoint" in metrics
    assert metrics["machine"]["torch"]  # the machine whose kernels computed it, as an ok run's says
    assert (out / "history.csv").is_file()
    assert json.loads((out / "status.json").read_text())["status"] == "diverged"


def test_a_finite_blow_up_keeps_no_checkpoint_of_the_diverged_parameters(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*TINY, "optim.lr=1000", "train.steps=50", "train.checkpoint_every=10", "train.log_every=10",
                   f"hydra.run.dir={out}", cwd=tmp_path)
    one_line_error(proc, "diverged")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged"
    if (out / "checkpoint.pt").exists():  # only a good window's checkpoint may be kept
        state = torch.load(out / "checkpoint.pt", weights_only=False)
        assert state["step"] < 50
    assert not list(out.glob(".checkpoint.good*"))


def test_the_good_checkpoint_is_the_one_written_before_the_divergence(tmp_path):
    from run import GoodCheckpoint
    from models import OneBit

    data = OneBit(3, (0.5, 0.5))
    good = GoodCheckpoint(tmp_path, data)
    (tmp_path / "tmp").write_bytes(b"step 10")
    os.replace(tmp_path / "tmp", tmp_path / "checkpoint.pt")  # saves replace checkpoint.pt by rename
    good(10, {"objective": 2.0})  # below n H(w) = 2.08: good
    (tmp_path / "tmp").write_bytes(b"step 20")
    os.replace(tmp_path / "tmp", tmp_path / "checkpoint.pt")
    good(20, {"objective": 1e21})  # blown up
    good(30, {"objective": float("nan")})
    assert "by step 10" in good.restore()
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"step 10"


def test_a_good_checkpoint_linked_twice_leaves_no_temporary_link(tmp_path):
    from run import GoodCheckpoint
    from models import OneBit

    good = GoodCheckpoint(tmp_path, OneBit(3, (0.5, 0.5)))
    (tmp_path / "checkpoint.pt").write_bytes(b"step 10")
    good(10, {"objective": 2.0})
    good(20, {"objective": 2.0})  # checkpoint.pt not saved again: the link already names the same file
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.good.pt", "checkpoint.pt"]


def test_a_run_still_in_its_kl_warmup_is_not_called_diverged(tmp_path):
    proc = run_cli(*TINY, "train.warmup=1000", "train.steps=50", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "ok"


# ---------------------------------------------------------------------------------------------------------------
# the sweep summary and signals


def test_a_sigterm_during_the_sweep_summary_is_delivered_after_it():
    from analysis.callbacks import signals_held

    seen, order = [], []
    old = signal.signal(signal.SIGTERM, lambda *_: seen.append("SIGTERM"))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            order.append(list(seen))  # not yet delivered
        order.append(list(seen))
    finally:
        signal.signal(signal.SIGTERM, old)
    assert order == [[], ["SIGTERM"]]


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_ctrl_c_just_after_the_preflight_claimed_a_new_dir_leaves_nothing(tmp_path, multirun):
    import zygote

    folder = tmp_path / "hook"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text("import cli\n_preflight = cli.preflight\n"
                                             "def preflight(*args, **kwargs):\n    _preflight(*args, **kwargs)\n"
                                             "    raise KeyboardInterrupt\ncli.preflight = preflight\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{folder}{os.pathsep}{ROOT}")
    out = tmp_path / "new" / "dir"
    args = ["-m", *TINY, "seed=0,1", f"hydra.sweep.dir={out}"] if multirun else [*TINY, f"hydra.run.dir={out}"]
    proc = zygote.run([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=env, timeout=300, fresh=True)
    assert proc.returncode == 130, proc.stderr
    said = ("error: interrupted by SIGINT before any job of the sweep began (no job ran)" if multirun
            else f"error: interrupted by SIGINT before the run began (nothing was written in {out})")
    assert proc.stderr == said + "\n"
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("hook, code, line", [
    ("import cli.build\n"  # a crash in building the run, as an overflow in a guide's init was
     "def build_objective(cfg):\n"
     "    raise RuntimeError('value cannot be converted to type float without overflow')\n"
     "cli.build.build_objective = build_objective\n",
     1, "error: crashed before training: RuntimeError: value cannot be converted"),
    ("import sys, infer.fit\n"  # a refusal by fit's own checks, after the run's dir was claimed
     "def check_arguments(*args, **kwargs):\n"
     "    raise ValueError('checkpoint_path=x is not allowed: refused by fit')\n"
     "sys.modules['infer.fit'].check_arguments = check_arguments\n",
     2, "error: checkpoint_path=x is not allowed: refused by fit"),
    ("import cli.build\n"  # Ctrl-C while the run is being built, before training
     "def build_objective(cfg):\n"
     "    raise KeyboardInterrupt\n"
     "cli.build.build_objective = build_objective\n",
     130, "error: interrupted by SIGINT before training (the run that was in"),
    ("import cli\n"  # Ctrl-C just after the preflight claimed the dir (it was left 'running', the run moved aside)
     "_preflight = cli.preflight\n"
     "def preflight(*args, **kwargs):\n"
     "    _preflight(*args, **kwargs)\n"
     "    raise KeyboardInterrupt\n"
     "cli.preflight = preflight\n",
     130, "error: interrupted by SIGINT before the run began (the run that was in"),
    ("import cli\n"  # Ctrl-C in Hydra's start-up, before the task recorded anything
     "_claim_for = cli.claim_for\n"
     "def claim_for(*args, **kwargs):\n"
     "    _claim_for(*args, **kwargs)\n"
     "    raise KeyboardInterrupt\n"
     "cli.claim_for = claim_for\n",
     130, "error: interrupted by SIGINT before the run began (the run that was in"),
], ids=["crash", "refused_by_fit", "interrupted", "interrupted_in_preflight", "interrupted_before_the_task"])
def test_a_run_that_fails_before_training_keeps_the_run_it_was_to_replace(tmp_path, finished_run, hook, code, line):
    import zygote

    run = copy_of(finished_run, tmp_path)
    before = {k: v for k, v in snapshot(run).items() if k != "run.log"}
    folder = tmp_path / "hook"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(hook)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{folder}{os.pathsep}{ROOT}")
    proc = zygote.run([sys.executable, str(ROOT / "run.py"), *TINY, "overwrite=true", f"hydra.run.dir={run}"],
                      cwd=tmp_path, env=env, timeout=300, fresh=True)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith(line) and proc.stderr.count("\n") == 1, proc.stderr
    assert {k: v for k, v in snapshot(run).items() if k != "run.log"} == before
    if code == 1:  # a crash names where its traceback is; the run dir holds the run it kept
        path = proc.stderr.split("traceback in ")[1].rstrip(")\n")
        assert "RuntimeError: value cannot be converted" in Path(path).read_text()
        Path(path).unlink()


# ---------------------------------------------------------------------------------------------------------------
# a path with '..' names the directory the OS reads it as: refused for the right reason, creating no folder


def test_a_run_path_takes_out_dot_dot_as_the_os_reads_it_and_resolves_no_other_symlink(tmp_path):
    from analysis.rundir import run_path

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    assert run_path(tmp_path / "new" / ".." / "base") == tmp_path / "base"
    assert run_path(tmp_path / "link" / "run") == tmp_path / "link" / "run"  # the link kept as given
    assert run_path(tmp_path / "link" / "..") == tmp_path / "real"  # up from the link's target, as the OS goes
    assert os.path.samefile(run_path(tmp_path / "link" / ".."), os.path.join(tmp_path, "link", ".."))


def test_a_run_dir_reached_through_a_folder_that_does_not_exist_is_refused_as_the_run_it_holds(tmp_path,
                                                                                             finished_run):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    proc = run_cli(*TINY, f"hydra.run.dir={tmp_path / 'new' / '..' / 'run'}", cwd=tmp_path)
    one_line_error(proc, f"output dir {run} already holds a run with status 'ok'", "overwrite=true")
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_parent_of_a_run_dir_spelled_with_dot_dot_is_refused_as_the_folder_that_holds_it(tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    proc = run_cli(*TINY, f"hydra.run.dir={run / '..'}", cwd=tmp_path)
    line = one_line_error(proc, f"hydra.run.dir={tmp_path} is not allowed: it holds the run directory {run}")
    assert "inside" not in line and snapshot(run) == before


def test_a_sweep_dir_reached_through_a_folder_that_does_not_exist_is_refused_as_the_run_it_holds(tmp_path,
                                                                                               finished_run):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    proc = run_cli("-m", *TINY, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'new' / '..' / 'run'}", cwd=tmp_path)
    one_line_error(proc, f"hydra.sweep.dir={run} is not allowed: it holds a run with status 'ok'")
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_resume_spelled_with_dot_dot_into_its_own_run_dir_resumes_in_place(tmp_path, finished_run):
    run = _killed(copy_of(finished_run, tmp_path))
    proc = run_cli(*TINY, "train.steps=40", f"train.resume={run / '..' / 'run' / 'checkpoint.pt'}",
                   f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "metrics.json").read_text())["steps"] == 40


def test_a_resume_reached_through_a_folder_that_does_not_exist_reads_the_checkpoint_it_names(tmp_path, finished_run):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    proc = run_cli(*TINY, "train.steps=40", f"train.resume={tmp_path / 'new' / '..' / 'run' / 'checkpoint.pt'}",
                   f"hydra.run.dir={run}", cwd=tmp_path)
    one_line_error(proc, f"output dir {run} holds a finished run (status ok)")
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_write_run_into_a_run_dir_reached_through_a_folder_that_does_not_exist_is_refused(tmp_path, finished_run):
    from analysis.report import write_run
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    model = VAE(3)
    guide = GaussianGuide(model)
    result = fit(model, guide, OneBit(3), steps=2)
    with pytest.raises(ValueError, match=f"^out={run} is not allowed: it already holds a run with status 'ok'"):
        write_run(tmp_path / "new" / ".." / "run", model, guide, OneBit(3), result, {}, figures=False)
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
