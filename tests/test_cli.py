"""The command line and the Hydra config: bad values fail early with one line; good ones run end to end."""
import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, run_cli

FAST = ["train.steps=30", "train.num_particles=8", "eval.samples=10000", "eval.replicates=4", "data.n=3"]


@pytest.mark.parametrize("override, key", [
    ("data.n=0", "data.n"), ("data.n=-3", "data.n"), ("data.n=abc", "data.n"), ("data.n=2.5", "data.n"),
    ("train.steps=0", "train.steps"), ("train.steps=-5", "train.steps"),
    ("optim.lr=0", "optim.lr"), ("optim.lr=-1e-3", "optim.lr"),
    ("model=foo", "model"), ("guide=bar", "guide"), ("data.weights=[0.9,0.9]", "data.weights"),
])
def test_a_bad_value_exits_nonzero_with_one_line_naming_the_key(tmp_path, override, key):
    proc = run_cli(*FAST, override, cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {key}"), proc.stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_a_guide_that_does_not_fit_the_model_is_refused_before_training(tmp_path):
    proc = run_cli(*FAST, "model=dlgm", "guide=gaussian", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "missing z2, z1" in proc.stderr and "extra z" in proc.stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_a_corrupt_resume_checkpoint_is_refused_and_left_alone(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"garbage")
    proc = run_cli(*FAST, f"train.resume={bad}", cwd=tmp_path)
    assert proc.returncode != 0 and "not a readable torch file" in proc.stderr
    assert bad.read_bytes() == b"garbage"


def compose_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_dlgm_chooses_the_structured_guide_by_default():
    assert compose_config("model=dlgm").guide.name == "structured"
    assert compose_config().guide.name == "gaussian"


def test_a_guide_on_the_command_line_wins_over_the_models_default():
    assert compose_config("model=dlgm", "guide=meanfield").guide.name == "meanfield"


def test_an_end_to_end_run_through_the_compose_api_writes_every_output(tmp_path):
    import run

    cfg = compose_config(*FAST, "model=dlgm")
    metrics = run.run(cfg, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"metrics.json", "history.csv", "checkpoint.pt"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("model", "guide", "n", "seed", "steps", "wall_seconds", "loss", "loss_se", "recon",
                "recon_per_dim", "kl", "estimator"):
        assert key in saved
    assert set(saved["kl"]) == {"z1", "z2"} and saved == json.loads(json.dumps(metrics))
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 1 + 30 // cfg.train.log_every + (30 % cfg.train.log_every > 0)


def test_the_command_line_prints_a_summary_with_estimators(tmp_path):
    proc = run_cli(*FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for word in ("loss", "recon", "recon/dim", "KL[z]", "Monte Carlo"):
        assert word in proc.stdout + proc.stderr
    assert len(list(tmp_path.rglob("metrics.json"))) == 1


def test_metrics_json_names_the_path_that_trained(tmp_path):
    proc = run_cli(*FAST, "hydra.run.dir=run", cwd=tmp_path)  # 30 steps: below the traced plan's minimum
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["engine"] == "fast"


def test_metrics_json_names_the_machine_whose_kernels_computed_it(tmp_path):
    import torch

    proc = run_cli(*FAST, "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    machine = json.loads((tmp_path / "run" / "metrics.json").read_text())["machine"]
    assert machine["torch_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert machine["torch"] == torch.__version__ and machine["cpu"]


def test_metrics_json_names_the_path_that_trained_each_phase_of_an_exact_likelihood_run(tmp_path):
    proc = run_cli(*FAST, "objective=exact", "objective.steps.vae=30", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (saved["model_phase"]["engine"], saved["engine"]) == ("general", "fast")  # no guide; then the guide


def test_a_refused_command_line_answers_without_importing_torch_or_pyro(tmp_path):
    # the checks before anything is built need neither: infer loads its torch names on first use (4.5 s -> 1.2 s)
    probe = ("import atexit, runpy, sys\n"
             "atexit.register(lambda: print('imported:', sorted({'torch', 'pyro'} & set(sys.modules))))\n"
             f"sys.argv = ['run.py', 'data.n=-1']\nrunpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.n=-1 is not allowed" in proc.stderr, proc.stderr
    assert "imported: []" in proc.stdout, proc.stdout
