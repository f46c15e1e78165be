"""A run never loses or mixes another run's files: what a claim on a run directory may remove, replace or refuse
(analysis.rundir), what a checkpoint must hold to be resumed (infer.checkpoint), and the one-line refusals of the
config keys and memory budget (infer.validate)."""
import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import overwrite_in_member, run_cli

FAST = ["train.steps=30", "train.num_particles=8", "eval.samples=10000", "eval.replicates=4", "data.n=3",
        "optim.lr=0.02", "eval.figures=false"]


def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file, and {relative path: 'dir'} of every folder, under folder."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def a_finished_run(folder: Path, extra=()) -> Path:
    """A directory laid out as a finished run (status ok, .hydra/, outputs, figures), plus `extra` foreign files."""
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"status": "ok", "reason": "finished"}))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (folder / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    for name in ("metrics.json", "history.csv", "checkpoint.pt", "encodings.nc", "training.png", "encodings.png",
                 "run.log"):
        (folder / name).write_text(f"old {name}")
    for name in extra:
        (folder / name).write_text(f"someone's {name}")
    return folder


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------------------------------------------
# a claim removes only what it created (finding 1)


def test_releasing_a_claim_on_a_dir_holding_a_run_leaves_every_file_that_was_there(tmp_path):
    from analysis.claim import Claim

    run = a_finished_run(tmp_path / "run")
    before = snapshot(run)
    claim = Claim(run, allow_existing=True)  # an in-place resume, refused before it trains
    (run / ".hydra" / "config.yaml").write_text("seed: 0\ntrain: {steps: 80}\n")  # as cli.save_hydra_files does
    (run / ".hydra" / "hydra.yaml").write_text("hydra: {}\n")
    (run / "traceback.txt").write_text("new")
    claim.release()
    assert snapshot(run) == before


def test_releasing_a_claim_on_a_new_dir_removes_it_and_the_parents_it_created(tmp_path):
    from analysis.claim import Claim

    claim = Claim(tmp_path / "a" / "b" / "run")
    (tmp_path / "a" / "b" / "run" / "run.log").write_text("log")
    claim.release()
    assert list(tmp_path.iterdir()) == []


def test_releasing_a_claim_on_a_dir_without_a_run_keeps_its_files(tmp_path):
    from analysis.claim import Claim

    folder = tmp_path / "foo"
    folder.mkdir()
    (folder / "precious.png").write_text("x")
    claim = Claim(folder)
    (folder / "run.log").write_text("log")
    claim.release()
    assert snapshot(folder) == {"precious.png": hashlib.sha256(b"x").hexdigest()}


# ---------------------------------------------------------------------------------------------------------------
# overwrite replaces a run's own files, and only once the new run has passed its checks (findings 2, 3)


def test_the_previous_run_is_its_known_outputs_and_nothing_else(tmp_path):
    from analysis.rundir import previous_run

    run = a_finished_run(tmp_path / "run", extra=["precious.png", "notes.txt"])
    (run / "seed3").mkdir()  # not listed as a replica: someone's folder
    assert sorted(previous_run(run)) == sorted(["status.json", ".hydra", "metrics.json", "history.csv",
                                                "checkpoint.pt", "encodings.nc", "training.png", "encodings.png",
                                                "run.log"])


def test_a_dir_that_holds_no_run_has_no_previous_run_to_replace(tmp_path):
    from analysis.rundir import previous_run

    (tmp_path / "foo").mkdir()
    (tmp_path / "foo" / "precious.png").write_text("x")
    (tmp_path / "foo" / "loss_vs_n.png").write_text("a sweep's figure")
    assert previous_run(tmp_path / "foo") == []


def test_the_replica_dirs_a_group_lists_belong_to_its_run(tmp_path):
    from analysis.rundir import previous_run

    run = a_finished_run(tmp_path / "run")
    (run / "status.json").write_text(json.dumps({"status": "ok", "replicas": ["seed0", "seed1", "../x"]}))
    for name in ("seed0", "seed1"):
        (run / name).mkdir()
    assert {"seed0", "seed1"} <= set(previous_run(run)) and "../x" not in previous_run(run)


def test_a_refused_overwrite_puts_the_previous_run_back_unchanged(tmp_path):
    from analysis.claim import Claim

    run = a_finished_run(tmp_path / "run", extra=["precious.png"])
    before = snapshot(run)
    claim = Claim(run, allow_existing=True, replace=True)
    assert not (run / "metrics.json").exists()  # aside: the new run's outputs never mix with the old ones
    assert (run / "precious.png").exists() and json.loads((run / "status.json").read_text())["status"] == "running"
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    claim.release()  # refused by a check after the claim (memory, guide, device)
    assert snapshot(run) == before


def test_an_overwrite_that_trains_deletes_the_previous_runs_files_and_no_other(tmp_path):
    from analysis.claim import Claim

    run = a_finished_run(tmp_path / "run", extra=["precious.png"])
    claim = Claim(run, allow_existing=True, replace=True)
    (run / "metrics.json").write_text("new")
    (run / "run.log").write_text("new run.log")
    claim.status("ok", "finished")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "precious.png", "run.log", "status.json"]
    assert (run / "metrics.json").read_text() == "new" and (run / "run.log").read_text() == "new run.log"


@pytest.fixture
def logging_to(tmp_path):
    """A FileHandler on the root logger writing (appending) to <tmp_path>/run/run.log, as Hydra's is in a sweep job
    when its claim is made; removed afterwards."""
    import logging

    handlers = []

    def start(path):
        handler = logging.FileHandler(path, mode="a")
        handler.emit(logging.makeLogRecord({"msg": "a line of this job"}))  # the handler opens the file
        logging.getLogger().addHandler(handler)
        handlers.append(handler)
        return handler

    yield start
    for handler in handlers:
        logging.getLogger().removeHandler(handler)
        handler.close()


def test_a_sweep_jobs_open_run_log_is_emptied_for_its_run_and_the_old_lines_kept_aside(tmp_path, logging_to):
    import logging

    from analysis.claim import Claim

    run = a_finished_run(tmp_path / "run")
    (run / "run.log").write_text("the old run's line\n")
    handler = logging_to(run / "run.log")
    claim = Claim(run, allow_existing=True, replace=True)
    handler.emit(logging.makeLogRecord({"msg": "the new run's line"}))
    claim.status("diverged", "training diverged")
    (backup,) = run.glob(".replaced.*")
    assert "the old run's line" in (backup / "run.log").read_text()
    assert (run / "run.log").read_text() == "the new run's line\n"


def test_a_refused_sweep_job_puts_the_old_run_log_back(tmp_path, logging_to):
    from analysis.claim import Claim

    run = a_finished_run(tmp_path / "run")
    logging_to(run / "run.log")
    before = (run / "run.log").read_text()
    Claim(run, allow_existing=True, replace=True).status("refused", "data.n=0 is not allowed")
    assert (run / "run.log").read_text() == before and not list(run.glob(".replaced*"))


@pytest.mark.parametrize("ending", ["diverged", "failed"])
def test_an_overwrite_that_does_not_end_ok_keeps_the_replaced_run_aside_and_names_it(tmp_path, ending):
    from analysis.claim import Claim

    run = a_finished_run(tmp_path / "run")
    claim = Claim(run, allow_existing=True, replace=True)
    claim.commit()  # training started
    (run / "metrics.json").write_text("new, diverged")
    claim.status(ending, "training diverged")
    (backup,) = run.glob(".replaced.*")
    assert (backup / "metrics.json").read_text() == "old metrics.json"
    assert (backup / "checkpoint.pt").read_text() == "old checkpoint.pt"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == ending and str(backup) in status["replaced_run"]


def test_a_run_that_ends_ok_deletes_the_backups_that_replacements_gone_wrong_left(tmp_path):
    from analysis.claim import Claim

    run = a_finished_run(tmp_path / "run")
    first = Claim(run, allow_existing=True, replace=True)
    first.status("diverged", "training diverged")
    assert list(run.glob(".replaced.*"))
    Claim(run, allow_existing=True).status("ok", "finished")  # a resume in place of the diverged run ends ok
    assert not list(run.glob(".replaced.*"))


def test_a_claim_whose_run_began_training_is_never_released(tmp_path):
    from analysis.claim import Claim

    claim = Claim(tmp_path / "run")
    claim.commit()  # training started
    (tmp_path / "run" / "checkpoint.pt").write_text("trained")
    claim.release()  # e.g. a crash whose status.json could not be written still says running
    assert (tmp_path / "run" / "checkpoint.pt").read_text() == "trained"


def test_a_file_that_cannot_be_written_is_named_and_leaves_the_old_one_whole(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from analysis.rundir import write_atomic

    (tmp_path / "metrics.json").write_text("old")

    def full(self, data):  # the disk fills after the first character
        with open(self, "w") as handle:
            handle.write(data[:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics\.json'"):
        write_atomic(tmp_path / "metrics.json", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    monkeypatch.undo()
    assert (tmp_path / "metrics.json").read_text() == "old"


def test_an_overwrite_into_a_dir_without_a_run_removes_nothing(tmp_path):
    from analysis.claim import Claim

    folder = tmp_path / "foo"
    folder.mkdir()
    (folder / "precious.png").write_text("x")
    claim = Claim(folder, allow_existing=True, replace=True)
    claim.status("ok", "finished")
    assert (folder / "precious.png").read_text() == "x"


def test_a_sweep_job_refused_after_an_overwrite_claim_keeps_the_previous_outputs(tmp_path):
    from analysis.claim import Claim

    run = a_finished_run(tmp_path / "run")
    claim = Claim(run, allow_existing=True, replace=True)
    claim.status("refused", "data.n=0 is not allowed")
    assert (run / "metrics.json").read_text() == "old metrics.json"
    assert (run / ".hydra" / "config.yaml").read_text() == "seed: 0\n"
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "refused" and "status 'ok'" in status["kept"]
    assert not list(run.glob(".replaced*"))


# ---------------------------------------------------------------------------------------------------------------
# where a run may not be claimed (finding 4)


@pytest.mark.parametrize("inner", ["sub", ".hydra", "sub/deeper"])
def test_a_claim_inside_another_runs_dir_is_refused_in_one_line(tmp_path, inner):
    from analysis.claim import Claim
    from analysis.rundir import RunDirError

    run = a_finished_run(tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(RunDirError) as err:
        Claim(run / inner)
    assert "hydra.run.dir" in one_line(err) and str(run) in one_line(err)
    assert snapshot(run) == before


def test_a_replica_dir_its_group_lists_may_be_claimed_in_place(tmp_path):
    from analysis.claim import Claim

    run = a_finished_run(tmp_path / "run")
    (run / "status.json").write_text(json.dumps({"status": "ok", "replicas": ["seed0"]}))
    replica = a_finished_run(run / "seed0")
    Claim(replica, allow_existing=True).release()


def test_the_current_dir_holding_other_files_is_refused(tmp_path, monkeypatch):
    from analysis.claim import Claim
    from analysis.rundir import RunDirError

    (tmp_path / "README.md").write_text("a repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirError) as err:
        Claim(Path(""))
    assert "hydra.run.dir" in one_line(err) and "current directory" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_an_empty_current_dir_may_be_claimed(tmp_path, monkeypatch):
    from analysis.claim import Claim

    monkeypatch.chdir(tmp_path)
    Claim(Path("")).release()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["", "  ", None])
def test_an_empty_run_dir_setting_is_refused_naming_the_key(value):
    from analysis.rundir import RunDirError, check_run_dir_setting

    with pytest.raises(RunDirError) as err:
        check_run_dir_setting(value)
    assert one_line(err).startswith("hydra.run.dir=")
    check_run_dir_setting("outputs/run")


def test_a_refused_in_place_resume_leaves_the_run_as_it_was(tmp_path):
    """The reviewer's reproduction: a resume into the finished run's own dir, refused after the claim."""
    run = tmp_path / "run"
    proc = run_cli(*FAST, "train.steps=40", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = {k: v for k, v in snapshot(run).items() if k != "run.log"}
    proc = run_cli(*FAST, "train.steps=80", f"train.resume={run / 'checkpoint.pt'}", f"hydra.run.dir={run}",
                   "memory_gb=0.0001", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert {k: v for k, v in snapshot(run).items() if k != "run.log"} == before


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint is checked entry by entry before anything resumes it (finding 10)


@pytest.fixture(scope="module")
def good_state(tmp_path_factory):
    """A real checkpoint (a tiny VAE fit, 20 steps), read back."""
    import pyro

    from guides import GaussianGuide
    from infer import ClosedFormELBO, fit
    from models import VAE, OneBit

    pyro.clear_param_store()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    model = VAE(3, hidden=8)
    fit(model, GaussianGuide(model, hidden=8), OneBit(3), elbo=ClosedFormELBO(num_particles=4), steps=20, lr=1e-2,
        log_every=5, seed=0, checkpoint_path=path, checkpoint_every=20)
    return torch.load(path, weights_only=False)


def corrupted(tmp_path, state, entry, value) -> Path:
    state = dict(state)
    if isinstance(entry, tuple):  # (entry, key): one item inside the entry
        state[entry[0]] = {**state[entry[0]], entry[1]: value}
    else:
        state[entry] = value
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    return path


def test_a_written_checkpoint_loads(tmp_path, good_state):
    from infer.checkpoint import load_checkpoint

    path = corrupted(tmp_path, good_state, "step", good_state["step"])
    assert load_checkpoint(path)["step"] == 20


@pytest.mark.parametrize("entry, value", [
    ("rng", None), (("rng", "torch"), None), (("rng", "numpy"), (1, 2)), (("rng", "python"), "abc"),
    ("step", "abc"), ("step", -5), ("step", 2.5), ("step", True),
    ("params", None), ("params", {"w": "abc"}), ("optimizer", None), ("optimizer", {"state": {}}),
    ("history", None), ("history", [{"step": "abc"}]), ("history", [{"step": 5, "loss": torch.zeros(3)}]),
    ("window", {"values": torch.zeros(2, 3), "betas": [1.0]}), ("window", "abc"),
    ("initial_loss", "abc"), ("buffers", {"b": 1}), ("average", {"start": 0}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_corrupt_entry_is_refused_in_one_line_naming_the_key_the_path_and_the_entry(tmp_path, good_state, entry,
                                                                                     value):
    from infer.checkpoint import CheckpointError, load_checkpoint

    path = corrupted(tmp_path, good_state, entry, value)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, label="train.resume")
    name = entry[0] if isinstance(entry, tuple) else entry
    assert one_line(err).startswith(f"train.resume={path}: its {name} entry ")
    assert len(one_line(err)) < 300


def test_a_checkpoint_with_nan_params_is_refused_without_a_tensor_dump(tmp_path, good_state):
    from infer.checkpoint import CheckpointError, load_checkpoint

    params = dict(good_state["params"])
    name = sorted(params)[0]
    params[name] = torch.full_like(params[name], float("nan"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(corrupted(tmp_path, good_state, "params", params))
    assert name in one_line(err) and "non-finite" in one_line(err) and "tensor(" not in one_line(err)
    assert len(one_line(err)) < 300


def test_a_checkpoint_whose_tensor_bytes_were_overwritten_is_refused_naming_the_damaged_member(tmp_path, good_state):
    from infer.checkpoint import CheckpointError, load_checkpoint

    path = corrupted(tmp_path, good_state, "step", good_state["step"])
    member = overwrite_in_member(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, label="train.resume")
    assert one_line(err).startswith(f"train.resume={path} is damaged: its member {member} does not match")


def test_fit_refuses_a_damaged_checkpoint_path_naming_resume_and_the_member(tmp_path, good_state):
    from guides import GaussianGuide
    from infer import ClosedFormELBO, fit
    from models import VAE, OneBit

    path = corrupted(tmp_path, good_state, "step", good_state["step"])
    member = overwrite_in_member(path)
    model = VAE(3, hidden=8)
    with pytest.raises(ValueError) as err:
        fit(model, GaussianGuide(model, hidden=8), OneBit(3), elbo=ClosedFormELBO(num_particles=4), steps=40,
            lr=1e-2, log_every=5, seed=0, resume=path)
    assert one_line(err).startswith(f"resume='{path}' is not allowed") and member in one_line(err)


def test_a_directory_given_as_a_checkpoint_is_named_as_one(tmp_path):
    from infer.checkpoint import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, label="train.resume")
    assert one_line(err).startswith(f"train.resume={tmp_path} is a directory") and "checkpoint.pt" in one_line(err)


@pytest.mark.slow  # an end-to-end CLI run: the default suite stays under 10 minutes
def test_a_corrupt_rng_state_is_refused_by_the_command_line_before_training(tmp_path, good_state):
    """The reviewer's reproduction: rng=None in a checkpoint whose config matches crashed in set_rng_state."""
    run = tmp_path / "run"
    proc = run_cli(*FAST, "train.steps=40", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["rng"] = None
    torch.save(state, tmp_path / "bad.pt")
    proc = run_cli(*FAST, "train.steps=80", f"train.resume={tmp_path / 'bad.pt'}", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(tmp_path / "bad.pt") in lines[0] and "rng entry" in lines[0]
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------------------------
# every guide and model key has a rule; the memory refusal names a budget that can be met (finding 14)


@pytest.mark.parametrize("key, bad, good", [
    ("guide.spread", -1, 1.0), ("guide.spread", float("inf"), 0.0),
    ("guide.init_scale", "abc", 0.1), ("guide.init_scale", float("inf"), 1e-3), ("guide.init_scale", 0, 2),
    ("guide.num_transforms", 0, 2), ("guide.num_transforms", 1.5, 1),
    ("guide.hidden_dim", "abc", [32]), ("guide.hidden_dim", [], [8, 8]), ("guide.hidden_dim", [0], [1]),
    ("guide.hidden_dim", [2.5], [4]),
    ("guide.components", 0, 3), ("guide.flows", 0, 1), ("guide.count_bins", 1, 8), ("guide.bound", 0, 5.0),
    ("guide.order", "cubic", "linear"), ("guide.gain", 1, False),
    ("model.name", "a/b", "vae"), ("guide.name", "", "gaussian"), ("model.name", 3, "dlgm"),
])
def test_a_guide_or_model_key_allows_what_its_rule_says_and_refuses_the_rest_naming_the_key(key, bad, good):
    from infer.validate import CONFIG_RULES

    test, allowed = CONFIG_RULES[key]
    assert test(good) and not test(bad)
    assert allowed and "\n" not in allowed


def test_every_key_of_every_guide_and_model_option_has_a_rule():
    from omegaconf import OmegaConf

    from cli import COMMAND_LINE_RULES
    from infer.validate import CONFIG_RULES

    conf = Path(__file__).resolve().parents[1] / "conf"
    unruled = []
    for group in ("guide", "model", "objective"):
        for option in sorted((conf / group).glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(option))
            node = node.get(group, node)
            for key in node:
                full = f"{group}.{key}"
                if key.startswith("_") or isinstance(node[key], dict) or (group == "objective" and key == "name"):
                    continue  # _target_/_convert_ are refused as overrides; objective.name by make_objective
                if full not in CONFIG_RULES and full not in COMMAND_LINE_RULES:
                    unruled.append(full)
    assert unruled == []


@pytest.mark.parametrize("override, key", [("guide=mixture guide.spread=-1", "guide.spread"),
                                           ("guide=autonormal guide.init_scale=inf", "guide.init_scale"),
                                           ("guide=autoiaf guide.num_transforms=0", "guide.num_transforms")])
def test_the_command_line_refuses_a_bad_guide_key_in_one_line_naming_it(tmp_path, override, key):
    proc = run_cli(*FAST, *override.split(), cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {key}=") and f"{key} must be" in lines[0]
    assert not (tmp_path / "outputs").exists()


GIB, BASE = 2 ** 30, 256 * 2 ** 20


@pytest.mark.parametrize("memory_gb, per_n", [(1e-9, 100.0), (0.2, 100.0), (2, 4e9), (2, 3e9)])
def test_a_memory_refusal_never_names_a_data_n_that_cannot_be(memory_gb, per_n):
    from cli.guards import memory_refusal

    line = memory_refusal(3, memory_gb, BASE, per_n, 1000, 32)
    assert line and "\n" not in line and "data.n <=" not in line and "lower data.n" not in line
    assert "memory_gb" in line


def test_a_memory_refusal_names_the_largest_data_n_that_fits():
    from cli.guards import memory_refusal

    line = memory_refusal(10 ** 6, 2, BASE, 2400.0, 65002275, 32)
    fits = int((2 * GIB - BASE) // 2400.0)
    assert f"fits data.n <= {fits:,} " in line
    assert memory_refusal(fits, 2, BASE, 2400.0, 1, 32) == "" and memory_refusal(fits + 1, 2, BASE, 2400.0, 1, 32)


# ---------------------------------------------------------------------------------------------------------------
# the Gaussian optimum's quadrature raises no floating-point overflow (finding 16)


@pytest.mark.parametrize("a", [0.008809930578925805, 0.5, 5.318, 2803.6504221226396, 2935.850029242773])
def test_expected_softplus_overflows_nowhere_and_matches_a_high_precision_quadrature(a):
    import mpmath
    import numpy as np

    from analysis.frontier import distortion
    from analysis.optimum import expected_softplus

    with np.errstate(over="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        value = float(distortion(1, np.array([a]))[0])  # np.vectorize over expected_softplus: flags are checked
    mpmath.mp.dps = 40
    sd = mpmath.sqrt(2 * mpmath.mpf(a))

    def integrand(u):
        return mpmath.npdf(u, a, sd) * mpmath.log1p(mpmath.exp(-u))

    exact = mpmath.quad(integrand, [a - 60 * sd, min(0, a), max(0, a), a + 60 * sd])
    assert value == expected_softplus(a)
    assert abs(value - float(exact)) <= 1e-13 * max(1.0, abs(float(exact))) + 1e-300
    if exact > 1e-250:
        assert abs(value / float(exact) - 1) < 1e-10


@pytest.mark.slow  # an end-to-end CLI run: the default suite stays under 10 minutes
def test_a_valid_run_prints_no_runtime_warning(tmp_path):
    """The reviewer's reproduction: seed=1 data.n=3 train.steps=20 printed numpy's overflow warning."""
    proc = run_cli("seed=1", "data.n=3", "train.steps=20", "eval.figures=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr


def test_a_dir_whose_replacement_was_killed_before_training_names_where_the_old_run_is(tmp_path):
    from analysis.claim import Claim
    from analysis.rundir import RunDirError, write_status

    write_status(tmp_path, "running")  # the replacement, SIGKILLed before its training began
    (tmp_path / ".replaced.4242").mkdir()
    (tmp_path / ".replaced.4242" / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"the run it was replacing is kept in .*\.replaced\.4242: move its files"):
        Claim(tmp_path)


def _claim_after(barrier, path, queue):
    """Claim path with overwrite=true as soon as the barrier lets go, slowed between the check for a live run and
    the status it writes (where an unlocked claim lets a second claim in)."""
    import time

    from omegaconf import OmegaConf

    import analysis.claim
    from cli.rundirs import claim_for

    init = analysis.claim.Claim.__init__

    def slow(self, *args, **kwargs):
        time.sleep(0.5)
        init(self, *args, **kwargs)

    analysis.claim.Claim.__init__ = slow
    barrier.wait()
    try:
        claim_for(OmegaConf.create({"overwrite": True, "train": {"resume": None}}), path, fresh=True)
        queue.put("claimed")
    except ValueError as err:
        queue.put(str(err))
    time.sleep(1.0)  # alive while the other one looks


def test_of_two_runs_replacing_one_run_at_once_exactly_one_gets_its_dir(tmp_path):
    import multiprocessing

    from analysis.rundir import write_status

    write_status(tmp_path, "ok", "finished")
    (tmp_path / "metrics.json").write_text("{}")
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim_after, args=(barrier, tmp_path, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = sorted(queue.get(timeout=30) for _ in procs)
    for p in procs:
        p.join()
    assert outcomes[0] == "claimed" and "is in use: the run there is still running" in outcomes[1]


@pytest.mark.parametrize("begun_before_the_run", [True, False], ids=["its process", "a reused pid"])
def test_a_running_status_names_its_owner_only_if_that_process_began_before_the_run(tmp_path, begun_before_the_run):
    """A pid the OS gave to another Python process after the run was killed is not the run (reruns into the dir were
    refused as 'in use' by it)."""
    import subprocess
    import sys
    import time

    from analysis.rundir import live_owner

    alive = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline() == "up\n"  # the interpreter runs (while it execs, its cmdline is empty)
        started = time.time() + (5 if begun_before_the_run else -60)
        (tmp_path / "status.json").write_text(json.dumps({
            "status": "running", "pid": alive.pid,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))}))
        assert live_owner(tmp_path) == (alive.pid if begun_before_the_run else None)
    finally:
        alive.kill()
        alive.wait()


def test_a_run_that_begins_in_a_dir_records_its_own_start_not_the_last_runs(tmp_path):
    from analysis.rundir import read_status, write_status

    (tmp_path / "status.json").write_text(json.dumps({"status": "ok", "pid": 1, "started": "2020-01-01T00:00:00"}))
    write_status(tmp_path, "running")
    begun = read_status(tmp_path)["started"]
    assert begun > "2026"
    write_status(tmp_path, "ok", "finished")  # the same run ends: its start stays
    assert read_status(tmp_path)["started"] == begun
