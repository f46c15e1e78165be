"""Bad inputs found by probing the command line and the Python API beyond the other suites: each is refused in one
line naming the key or argument and what is allowed (exit 2 / ValueError), before training, leaving nothing behind;
and no setting is silently ignored (a run's config never says what it did not do)."""
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

# the command-line integrity suite's tiny config, its one-line error check, snapshot and finished run (a fixture)
from test_cli_integrity import TINY, finished_run, one_line_error, snapshot  # noqa: F401, E402


# ---------------------------------------------------------------------------------------------------------------
# threads


def test_a_thread_count_torch_cannot_start_is_refused_by_the_command_line(tmp_path):
    proc = run_cli(*TINY, "threads=100000", cwd=tmp_path)  # it segfaulted after claiming a 'running' run dir
    one_line_error(proc, "threads=100000", "<= 1024")
    assert not list(tmp_path.iterdir())


def test_fit_refuses_a_thread_count_torch_cannot_start():
    from infer.validate import check

    with pytest.raises(ValueError, match=r"threads=100000 is not allowed: threads must be an integer >= 1 and <= 1024"):
        check("threads", 100000)


# ---------------------------------------------------------------------------------------------------------------
# a group of keys replaced by one value, and Hydra's ??? (a missing mandatory value)


def refusal(*overrides) -> str:
    """The one-line ConfigError the command line's checks (cli.values.validate) give the composed config."""
    from cli.keys import compose_config
    from cli.state import ConfigError
    from cli.values import validate

    with pytest.raises(ConfigError) as err:
        validate(compose_config([*TINY, *overrides]))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_group_of_keys_set_to_one_value_is_refused_naming_it(tmp_path):
    proc = run_cli(*TINY, "train=null", cwd=tmp_path)  # it crashed after the claim (TypeError in the memory guard)
    one_line_error(proc, "train=None is not allowed", "train is a group of keys", "train.steps")
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
    assert refusal("eval=null").startswith("eval=None is not allowed: eval is a group of keys")  # a traceback


def test_a_missing_mandatory_value_is_refused_naming_the_key(tmp_path):
    proc = run_cli(*TINY, "train.steps=???", cwd=tmp_path)  # it crashed mid-run (MissingMandatoryValue)
    one_line_error(proc, "train.steps=??? is not allowed", "train.steps must be an integer in [1, 1000000000]")
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())
    assert refusal("train.resume=???").startswith("train.resume=??? is not allowed")  # it ran without resuming


def test_a_final_learning_rate_above_the_first_is_refused_naming_both_keys():
    # the decay climbed to lr_final=1 and the run 'diverged', blaming optim.lr, which was its default
    assert refusal("optim.lr_final=1").startswith("optim.lr_final=1 is not allowed with optim.lr=0.003: the "
                                                  "exponential schedule decays the learning rate")


# ---------------------------------------------------------------------------------------------------------------
# replicas with what they cannot train


def test_replicas_with_a_frozen_model_are_refused_rather_than_training_the_model(tmp_path):
    # fit_replicas has no frozen model: the replicas trained it, while their config.yaml said freeze_model: true
    proc = run_cli(*TINY, "replicas=2", "train.freeze_model=true", cwd=tmp_path)
    one_line_error(proc, "train.freeze_model=true is not allowed with replicas=2")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("guide", ["mixture", "autonormal"])
def test_replicas_of_a_guide_that_cannot_stack_are_refused_naming_guide_and_replicas(guide):
    assert refusal("replicas=2", f"guide={guide}").startswith(
        f"replicas=2 is not allowed with guide={guide}: its networks cannot take a replica dimension; replicas train "
        "the gaussian, structured, meanfield and flow guides")


# ---------------------------------------------------------------------------------------------------------------
# Hydra's sweep syntax


@pytest.mark.parametrize("args, words", [
    (["-m", "seed=glob(*)"], ["seed=glob(...) is not allowed: glob() sweeps the options of a config group"]),
    (["-m", "model=glob(x*)"], ["model=glob(x*) is not allowed: it chooses no option of model"]),
    (["-m", "seed=range(0,0)"], ["seed=range(0,0) is not allowed: it sweeps over no value"]),
    (["--cfg", "job", "seed=0,1"], ["seed=0,1 sweeps seed over several values; add -m"]),
    (["--info", "seed=range(0,2)"], ["seed=range(0,2) sweeps seed over several values; add -m"]),
    (["-m", "optim.lr=interval(0.1,0.2)"], ["optim.lr=interval(0.1,0.2) is not allowed: optim.lr sweeps an interval()",
                                           "needs a sweeper that samples (hydra/sweeper=optuna)"]),
    (["-m", "seed=tag(a,interval(0,1))"], ["seed=tag(a,interval(0,1)) is not allowed", "hydra/sweeper=optuna"]),
    (["-m", "model=interval(0,1)"], ["model=interval(0,1) is not allowed", "model must be one option, one of"]),
    (["-m", "seed=range(0,2),5"], ["seed=range(0,2),5 is not allowed: a sweep's values are single values"]),
], ids=["glob of a plain key", "glob of no option", "empty range", "print a sweep", "info of a sweep",
        "interval under the basic sweeper", "tagged interval", "interval of a group", "a range among values"])
def test_sweep_syntax_that_runs_nothing_or_needs_m_is_refused_in_one_line(tmp_path, args, words):
    # tracebacks (ConfigLoader is not set; requires --multirun), and an empty range ran 0 jobs and exited 0
    proc = run_cli(*args[:-1], *TINY, args[-1], cwd=tmp_path) if args[0] == "-m" else run_cli(*args, cwd=tmp_path)
    one_line_error(proc, *words)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("sweep", ["seed=1,choice(2,3)", "seed=choice(1,choice(2,3))", "optim.lr=0.1,interval(0,1)",
                                   "seed=range(0,2),5"])
def test_a_sweep_among_a_sweeps_values_is_refused_naming_the_override(sweep):
    from cli.keys import parse_overrides
    from cli.state import ConfigError

    with pytest.raises(ConfigError, match=f"^{re.escape(sweep)} is not allowed: a sweep's values are single values"):
        parse_overrides(["data.n=3", sweep])


def test_an_interval_in_the_configs_sweep_params_is_refused_saying_where_it_is():
    from cli.state import ConfigError
    from cli.sweep import check_enumerable

    with pytest.raises(ConfigError, match=r"^optim.lr=interval\(0.1,0.2\) \(in the config's hydra.sweeper.params\) is "
                                          r"not allowed: optim.lr sweeps an interval\(\)"):
        check_enumerable(["optim.lr=interval(0.1,0.2)", "seed=0,1"], given=1)


def test_a_glob_over_a_groups_options_is_checked_option_by_option():
    from cli.keys import check_group_choices

    check_group_choices(["model=glob(v*)", "guide=glob(*)"])  # vae; every guide: all options exist


# ---------------------------------------------------------------------------------------------------------------
# options after overrides


@pytest.mark.parametrize("args", [["data.n=3", "-m", "seed=0,1"], ["data.n=3", "--multirun"]])
def test_an_option_after_an_override_is_refused_in_one_line_and_leaves_no_sweep_dir(tmp_path, args):
    # argparse printed its multi-line usage, after the preflight had claimed multirun/<date>/<time>/.sweep.lock
    proc = run_cli(*args, cwd=tmp_path)
    one_line_error(proc, f"{args[1]} comes after the override data.n=3", "options go before the overrides")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args", [["data.n=3", "--cfg", "job", "seed=1"], ["data.n=3", "--info", "defaults", "seed=1"]])
def test_a_print_option_between_two_overrides_is_refused_in_one_line(tmp_path, args):
    proc = run_cli(*args, cwd=tmp_path)  # argparse printed its multi-line usage ('unrecognized arguments: seed=1')
    one_line_error(proc, f"{args[1]} comes after the override data.n=3", f"python run.py {args[1]} {args[2]} data.n=3")
    assert not list(tmp_path.iterdir())


def test_an_option_after_the_overrides_that_argparse_takes_still_runs(tmp_path):
    proc = run_cli("data.n=3", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0 and "n: 3" in proc.stdout, proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# a sweep into a run's directory


@pytest.mark.parametrize("inside", ["", "sub"])
def test_a_sweep_into_or_inside_a_runs_dir_is_refused_and_the_run_is_left_as_it_was(tmp_path, finished_run, inside):
    # the sweep wrote .sweep.lock, multirun.yaml, summary files and its job dirs into the finished run's dir
    run = shutil.copytree(finished_run, tmp_path / "run")
    before = snapshot(run)
    proc = run_cli("-m", *TINY, "seed=0,1", f"hydra.sweep.dir={run / inside}", cwd=tmp_path)
    one_line_error(proc, "hydra.sweep.dir=", "no sweep writes into a run's directory")
    assert snapshot(run) == before and sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in finished_run.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# the Python API


@pytest.fixture
def vae():
    from guides import GaussianGuide
    from models import VAE, OneBit

    model = VAE(3)
    return model, GaussianGuide(model), OneBit(3)


def tiny_fit(model, guide, data, **kwargs):
    from infer import ClosedFormELBO, fit

    return fit(model, guide, data, **{"steps": 3, "elbo": ClosedFormELBO(num_particles=4), "seed": 0, **kwargs})


def like(data, **replace):
    """An object like the one-bit data (n, x, w, weights), with some of its entries replaced."""
    fields = {"n": data.n, "x": data.x, "w": data.w, "weights": data.weights, **replace}
    return type("LikeOneBit", (), fields)()


def test_fit_refuses_the_meta_device_and_leaves_the_model_where_it_was(vae):
    model, guide, data = vae
    with pytest.raises(ValueError, match=r"^device='meta' is not allowed: .*'cpu'"):
        tiny_fit(model, guide, data, device="meta")  # the model was moved to meta (its values lost) before
    assert all(p.device.type == "cpu" for p in list(model.parameters()) + list(guide.parameters()))


@pytest.mark.parametrize("x", [torch.full((2, 3), 0.5), torch.full((2, 3), math.nan)])
def test_fit_refuses_data_whose_x_are_not_bits(vae, x):
    model, guide, data = vae
    with pytest.raises(ValueError, match=r"^data\.x is not allowed: its values must be bits, 0 or 1") as err:
        tiny_fit(model, guide, like(data, x=x))  # 0.5: a multi-line support error from the Bernoulli
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("w", [torch.tensor([-0.5, 1.5]), torch.tensor([math.nan, 0.5]), torch.tensor([0.2, 0.2])])
def test_fit_refuses_data_whose_weights_are_not_two_positive_numbers_summing_to_1(vae, w):
    model, guide, data = vae
    with pytest.raises(ValueError, match=r"^data\.w=.* is not allowed: data\.w must be .*positive finite numbers"):
        tiny_fit(model, guide, like(data, w=w))  # (-0.5, 1.5) trained to a number; nan 'diverged'


def test_fit_refuses_a_callback_that_cannot_take_step_and_row_before_training(vae):
    model, guide, data = vae
    calls = []
    with pytest.raises(ValueError, match=r"^callback=.* is not allowed: callback must be a callable "
                                         r"callback\(step, row\)"):
        tiny_fit(model, guide, data, log_every=1, callback=lambda: calls.append(1))  # a TypeError at the first log


@pytest.mark.parametrize("seed", [np.uint32(5), np.int64(5)])
def test_fit_takes_a_numpy_integer_seed_as_the_python_integer_it_equals(vae, seed):
    model, guide, data = vae
    numpy_seeded = tiny_fit(model, guide, data, seed=seed)  # a TypeError from Python's random.seed
    assert type(numpy_seeded.recipe["seed"]) is int
    assert numpy_seeded.history == tiny_fit(model, guide, data, seed=5).history


# ---------------------------------------------------------------------------------------------------------------
# resume


def test_a_resume_that_freezes_the_model_is_refused_naming_train_freeze_model(tmp_path, finished_run):
    # it was refused inside fit as 'the checkpoint's optimizer state does not fit these params', naming no key
    proc = run_cli(*TINY, f"train.resume={finished_run / 'checkpoint.pt'}", "train.freeze_model=true", cwd=tmp_path)
    one_line_error(proc, "was written with other settings: train.freeze_model (False -> True)")
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_whose_config_predates_train_freeze_model_still_resumes(tmp_path, finished_run):
    from cli.keys import compose_config
    from cli.resume import load_resume

    state = torch.load(finished_run / "checkpoint.pt", weights_only=False)
    state["config"].pop("train.freeze_model", None)
    torch.save(state, tmp_path / "old.pt")
    assert load_resume(compose_config([*TINY, f"train.resume={tmp_path / 'old.pt'}"]))["step"] == state["step"]


def test_a_python_resume_with_other_adam_betas_is_refused_rather_than_run_with_the_checkpoints(vae, tmp_path):
    # the optimizer's state put the checkpoint's betas back: it trained with (0.9, 0.99), its recipe said (0.5, 0.6)
    model, guide, data = vae
    tiny_fit(model, guide, data, adam_betas=(0.9, 0.99), checkpoint_path=tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"^adam_betas=\(0\.5, 0\.6\) is not allowed with this resume: .*\(0\.9, "
                                         r"0\.99\)"):
        tiny_fit(model, guide, data, steps=6, adam_betas=(0.5, 0.6), resume=tmp_path / "c.pt")
    again = tiny_fit(model, guide, data, steps=6, adam_betas=(0.9, 0.99), resume=tmp_path / "c.pt")
    assert again.recipe["adam_betas"] == (0.9, 0.99) and again.steps == 6


# ---------------------------------------------------------------------------------------------------------------
# a list or dict where a group takes one option


@pytest.mark.parametrize("override", ["model=[vae,dlgm]", "data={n:4,weights:[0.5,0.5]}"])
def test_a_list_or_dict_for_a_config_group_is_refused_naming_the_whole_value(tmp_path, override):
    proc = run_cli(*TINY, override, cwd=tmp_path)  # it was named by its first comma's fragment: 'model=[vae'
    one_line_error(proc, f"{override} is not allowed", "must be one option")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# a run dir whose run is still training in another process


def running_dir(folder: Path, pid: int, like: Path) -> Path:
    """A copy of the run `like` whose status.json says that process pid is running it."""
    import json

    shutil.copytree(like, folder)
    (folder / "status.json").write_text(json.dumps({"status": "running", "reason": "", "pid": pid}))
    return folder


@pytest.mark.parametrize("how", [["overwrite=true"], ["train.resume={dir}/checkpoint.pt"]])
def test_a_dir_whose_run_is_still_training_is_refused_even_with_overwrite(tmp_path, finished_run, how):
    # overwrite=true moved the live run's files aside and ran beside it: the dir ended with the new run's metrics
    # and the old process's checkpoint.pt and status
    import subprocess
    import sys

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = running_dir(tmp_path / "run", alive.pid, finished_run)
        before = snapshot(run)
        args = [a.format(dir=run) for a in how]
        proc = run_cli(*TINY, *args, f"hydra.run.dir={run}", cwd=tmp_path)
        one_line_error(proc, "is in use: the run there is still running", f"pid {alive.pid}")
        assert snapshot(run) == before
    finally:
        alive.kill()
        alive.wait()


def test_a_dir_left_running_by_a_killed_process_may_still_be_overwritten(tmp_path, finished_run):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = running_dir(tmp_path / "run", dead.pid, finished_run)
    proc = run_cli(*TINY, "overwrite=true", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint's parameter average


@pytest.fixture
def averaging_checkpoint(vae, tmp_path):
    """The state a 10-step fit averaging its last 5 iterates wrote at step 7 (inside the averaging window)."""
    from infer.checkpoint import load_checkpoint

    model, guide, data = vae

    def keep(step, row):
        if step == 8:  # the checkpoint of step 7, before the final one replaces it
            shutil.copy(tmp_path / "c.pt", tmp_path / "at7.pt")

    tiny_fit(model, guide, data, steps=10, average=0.5, checkpoint_path=tmp_path / "c.pt", checkpoint_every=7,
             log_every=1, callback=keep)
    state = load_checkpoint(tmp_path / "at7.pt")
    assert state["step"] == 7 and state["average"]["count"] == 2
    return state


@pytest.mark.parametrize("entry, value, words", [
    ("count", -1, "'count': an integer >= 0"),  # a ZeroDivisionError in the first averaged step
    ("means", "nan", "holds non-finite means"),  # it 'diverged at step 10 ... lower lr'
    ("count", 1, "counts 1 averaged steps after step 5, where the checkpoint's step is 7"),  # a mean mis-weighted
    ("start", 9, "counts 2 averaged steps after step 9"),  # its mean dropped, the averaging restarted at step 7
])
def test_a_resume_refuses_a_corrupt_parameter_average_in_one_line_naming_it(vae, averaging_checkpoint, entry, value,
                                                                            words):
    model, guide, data = vae
    average = dict(averaging_checkpoint["average"])
    average[entry] = [m * math.nan for m in average["means"]] if value == "nan" else value
    with pytest.raises(ValueError, match=r"^resume: its average entry ") as err:
        tiny_fit(model, guide, data, steps=10, average=0.5, resume={**averaging_checkpoint, "average": average})
    assert words in str(err.value)


def test_a_group_swept_without_m_is_refused_as_a_key_swept_without_m_is(tmp_path):
    # Hydra's 'Ambiguous value' advised key=[value1,value2], which a config group refuses
    proc = run_cli(*TINY, "guide=gaussian,flow", cwd=tmp_path)
    one_line_error(proc, "guide=gaussian,flow sweeps guide over several options; add -m")
    assert not list(tmp_path.iterdir())


def test_a_relative_resume_path_resumes_with_hydra_job_chdir(tmp_path, finished_run):
    # checked from the launch dir, then read again from the run dir: 'train.resume=prev/checkpoint.pt does not exist'
    shutil.copytree(finished_run, tmp_path / "prev")
    proc = run_cli(*TINY, "train.resume=prev/checkpoint.pt", "hydra.job.chdir=true", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_a_weight_float32_cannot_hold_is_refused_naming_data_weights():
    from models import OneBit

    # it became 0 in the data's float32 tensor: the run trained one point while its config said two
    assert refusal("data.weights=[1e-300,1.0]").startswith("data.weights=[1e-300, 1.0] is not allowed")
    with pytest.raises(ValueError, match=r"^weights=\(1e-300, 1\.0\) is not allowed: .*1\.2e-38"):
        OneBit(3, (1e-300, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# networks too wide to build


def test_a_network_too_wide_to_allocate_is_refused_by_the_memory_guard_in_one_line(tmp_path):
    # the guard built it at n = 1 to count its params: a 4e14-byte allocation crashed the run (exit 1, traceback),
    # and model.hidden=100000 allocated about 40 GB before the refusal; now it is counted on the meta device
    proc = run_cli(*TINY, "model.hidden=10000000", cwd=tmp_path)
    one_line_error(proc, "params", "memory_gb=2 does not fit even data.n=1", "model.hidden")
    assert not list(tmp_path.iterdir())


def test_the_memory_guard_counts_a_networks_params_without_allocating_them():
    from cli.build import build
    from cli.guards import network_params
    from cli.keys import compose_config

    cfg = compose_config([*TINY, "model.hidden=100000"])  # one 100000 x 100000 layer: 40 GB of float32
    assert network_params(cfg, build) > 10**10  # exact counts: test_cli_integrity's memory guard test


# ---------------------------------------------------------------------------------------------------------------
# settings finite but so large that the model or the loss overflows before any update


def last_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("error: "), proc.stderr
    return lines[-1]


@pytest.mark.parametrize("overrides, key", [
    (("guide=mixture", "guide.spread=1e30"), "guide.spread=1e+30"),
    (("guide=flow", "guide.bound=1e30"), "guide.bound=1e+30"),
])
def test_a_loss_not_finite_at_the_initial_parameters_names_the_settings_that_made_it(tmp_path, overrides, key):
    proc = run_cli(*TINY, *overrides, cwd=tmp_path)  # it said 'check ... the model and the guide', naming no key
    line = last_error_line(proc)
    assert "at the initial parameters" in line and key in line, line


def test_a_model_that_fails_on_the_data_names_the_settings_that_made_it_fail(tmp_path):
    proc = run_cli(*TINY, "model=dlgm", "model.prior_gain_floor=1e30", cwd=tmp_path)  # exp(1e30): inf locs
    line = one_line_error(proc, "model(x) failed", "model.prior_gain_floor=1e+30")
    assert not list(tmp_path.iterdir()), line


def test_replicas_whose_loss_is_not_finite_diverge_rather_than_being_told_they_cannot_stack(tmp_path):
    proc = run_cli(*TINY, "replicas=2", "guide=flow", "guide.bound=1e30", cwd=tmp_path)
    line = last_error_line(proc)  # nan != nan: it said the flow guide cannot take a replica dimension
    assert "replica dimension" not in line and "at the initial parameters" in line and "guide.bound=1e+30" in line


@pytest.mark.parametrize("key", ["guide.min_scale", "model.min_scale"])
def test_a_scale_floor_above_the_priors_unit_scale_is_refused_naming_the_key(key):
    # guide.min_scale=100 crashed in evaluation; model.min_scale=1e30 gave an exact loss beside a nan NLL
    assert refusal("model=dlgm", f"{key}=100").startswith(f"{key}=100 is not allowed: {key} must be a number in (0, 1]")


def test_the_gaussian_frontier_at_a_rate_beyond_float64s_separations_is_its_limit_zero():
    from analysis.frontier import distortion_above_frontier, distortion_at_rate

    assert distortion_at_rate(3, 5000.0) == 0.0  # a = 2 (e^{2R} - 1) overflows: it raised 'a must be finite'
    assert distortion_at_rate(3, 300.0) == 0.0 and distortion_above_frontier(3, 5000.0, 0.05) == 0.05


# ---------------------------------------------------------------------------------------------------------------
# a divergence blamed on the learning rate names the other settings that scale an update


@pytest.mark.parametrize("steps, kind", [(100, "finite"), (300, "non-finite")])
def test_a_divergence_with_adams_betas_moved_names_them_beside_the_learning_rate(tmp_path, steps, kind):
    # beta2 = 1e-30 makes every step lr-sized whatever the gradient: the line said only 'lower optim.lr'
    n = 3 if kind == "finite" else 5
    proc = run_cli(*TINY, f"data.n={n}", f"train.steps={steps}", "optim.betas=[0.9,1e-30]", cwd=tmp_path)
    line = last_error_line(proc)
    assert line.startswith("error: training diverged") and "optim.lr" in line, line
    assert "non-finite" in line if kind == "non-finite" else "non-finite" not in line, line
    assert line.endswith("this run also sets optim.betas=[0.9, 1e-30] away from their defaults"), line


def test_a_divergence_at_the_default_betas_names_only_the_learning_rate(tmp_path):
    proc = run_cli(*TINY, "data.n=5", "train.steps=100", "optim.lr=10", cwd=tmp_path)
    line = last_error_line(proc)
    assert line.startswith("error: training diverged") and "optim.lr" in line and "also sets" not in line, line


# ---------------------------------------------------------------------------------------------------------------
# sizes beyond any run: refused before training (they crashed after it, or hung), with the bound named


@pytest.mark.parametrize("override, allowed", [
    ("train.steps=99999999999999999999", "train.steps must be an integer in [1, 1000000000]"),  # OverflowError
    ("model.depth=1000000", "model.depth must be an integer in [2, 100]"),  # the memory check hung
    ("model.layers=1000000", "model.layers must be an integer in [0, 100]"),
    ("eval.samples=1000000000000", "eval.samples must be an integer in [10000, 16777216]"),  # 8 TB after training
    ("eval.iwae_k=1000000000000", "eval.iwae_k must be an integer in [1, 8388608]"),
    ("train.progress=1", "train.progress must be auto, true or false"),  # 1 == True passed as a boolean
])
def test_a_size_beyond_any_run_is_refused_naming_its_bound(override, allowed):
    model = ["model=dlgm"] if "depth" in override else []
    assert allowed in refusal(*model, override)


def test_fit_refuses_a_step_budget_beyond_any_run():
    from infer.validate import check

    with pytest.raises(ValueError, match=r"steps=10\*\*20|steps=100000000000000000000 is not allowed: steps must be "
                                         r"an integer in \[1, 1000000000\]"):
        check("steps", 10 ** 20)


def test_evaluate_refuses_more_draws_than_any_evaluation_needs():
    from infer.validate import check_samples

    with pytest.raises(ValueError, match=r"samples=1000000000000 is not allowed: samples must be at most 16777216"):
        check_samples(10 ** 12, 16)


def test_the_exact_objectives_lattice_is_held_to_the_memory_budget(tmp_path):
    proc = run_cli(*TINY, "objective=exact", "objective.nodes=10000000", "memory_gb=0.5", cwd=tmp_path)  # 8 TB: 1e12
    one_line_error(proc, "10,000,000 particles", "lower objective.nodes")
    assert not list(tmp_path.iterdir())


def test_networks_too_wide_to_count_are_refused_in_one_line(tmp_path):
    proc = run_cli(*TINY, "model.hidden=1000000000000", cwd=tmp_path)  # torch: storage size overflowed
    one_line_error(proc, "cannot be allocated", "model.* and guide.* widths")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("choice", ["pair=null", "+experiment=null"])
def test_no_option_for_an_optional_group_is_refused_naming_the_options(tmp_path, choice):
    proc = run_cli(*TINY, choice, cwd=tmp_path)  # Hydra: "Config group override must be a string or a list"
    group = choice.lstrip("+").split("=")[0]
    one_line_error(proc, f"{choice} is not allowed: {group} must be one of", f"leave {group} out")


# ---------------------------------------------------------------------------------------------------------------
# what is already written is never mixed with or replaced


def test_a_folder_of_runs_is_refused_as_a_run_directory(finished_run, tmp_path):
    folder = tmp_path / "runs"
    shutil.copytree(finished_run, folder / "one")
    before = snapshot(folder)
    proc = run_cli(*TINY, f"hydra.run.dir={folder}", cwd=tmp_path)  # it wrote a run beside the runs it holds
    one_line_error(proc, f"hydra.run.dir={folder} is not allowed: it holds the run directory {folder / 'one'}")
    assert snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["one"]


def test_write_run_refuses_a_directory_that_holds_a_run_unless_told_to_overwrite(finished_run, tmp_path):
    from analysis.report import evaluate, write_run
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    data = OneBit(3)
    model = VAE(3)
    guide = GaussianGuide(model)
    result = fit(model, guide, data, steps=20)
    metrics, grids = evaluate(model, guide, data, samples=1024, replicates=4)
    with pytest.raises(ValueError, match=r"already holds a run with status 'ok'; .*overwrite=True") as err:
        write_run(run, model, guide, data, result, metrics, grids, figures=False)
    assert "\n" not in str(err.value) and snapshot(run) == before
    write_run(run, model, guide, data, result, metrics, grids, figures=False, overwrite=True)
    assert snapshot(run)["metrics.json"] != before["metrics.json"]


def test_write_run_with_overwrite_replaces_the_previous_run_whole_and_keeps_files_that_are_not_a_runs(
        finished_run, tmp_path):
    import json

    from analysis.report import evaluate, write_run
    from guides import StructuredGuide
    from infer import fit
    from models import DLGM, OneBit

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)  # a command-line vae run: .hydra/, status.json, checkpoint.pt, figures
    (run / "notes.txt").write_text("mine")
    old = snapshot(run)
    data = OneBit(3)
    model = DLGM(3)
    guide = StructuredGuide(model)
    result = fit(model, guide, data, steps=20, seed=3)
    metrics, grids = evaluate(model, guide, data, samples=1024, replicates=4)
    write_run(run, model, guide, data, result, metrics, grids, figures=False, overwrite=True)
    now = snapshot(run)
    assert not any(name.startswith(".hydra") or name.endswith(".png") for name in now)  # the old run's, all gone
    assert not any(name.startswith(".replaced") for name in now) and now["notes.txt"] == old["notes.txt"]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "ok" and "loss" not in status  # the new run's record, not the vae's
    assert json.loads((run / "metrics.json").read_text())["model"] == "dlgm"
    from infer.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoint.pt")["model"] == "dlgm"  # the new run's checkpoint, not the vae's


def test_a_checkpoint_holding_other_python_objects_is_refused_without_running_them(tmp_path):
    import os

    from infer.checkpoint import load_checkpoint

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"params": Payload(), "optimizer": {}, "rng": {}, "step": 1}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"is not a checkpoint this project wrote: it holds Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Hydra's own options


@pytest.mark.parametrize("args, words", [
    (["--cfg", "job", "data.n=abc"], ["data.n='abc' is not allowed"]),  # printed the config, exit 0
    (["--help", "optim.lr=-1"], ["optim.lr=-1 is not allowed"]),
    (["--info", "data.n=5"], ["--info data.n=5: --info takes one of all, config"]),  # argparse's usage, 8 lines
    (["--config-name", "foo"], ["--config-name foo: run.py has one primary config"]),  # 8 lines, exit 1
    (["--config-dir", "/nonexistent/onebit"], ["--config-dir /nonexistent/onebit: --config-dir must name an existing"]),
    (["--cfg", "job", "--package", "foo"], ["--package foo: no such node in the config"]),  # exit 1
    (["--experimental-rerun", "/nonexistent/config.pickle"], ["no such file"]),  # a two-line warning first
    (["hydra.run.dir=null"], ["hydra.run.dir=null is not allowed: hydra.run.dir must name a directory"]),
    (["data.weights={a:0.5,b:0.5}"], ["data.weights={a:0.5,b:0.5} is not allowed: data.weights must be two"]),
])
def test_hydras_options_with_bad_values_are_refused_in_one_line(tmp_path, args, words):
    proc = run_cli(*args, cwd=tmp_path)
    one_line_error(proc, *words)
    assert not list(tmp_path.iterdir())


def test_hydra_mode_is_left_to_the_options(tmp_path):
    proc = run_cli(*TINY, "hydra.mode=MULTIRUN", cwd=tmp_path)  # it left a run dir 'running' for ever
    one_line_error(proc, "hydra.mode=MULTIRUN is not allowed", "-m")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# interpolations


def test_an_interpolation_that_resolves_to_nothing_is_refused_naming_the_key_and_what_is_allowed():
    line = refusal("train.steps=${oops}")  # omegaconf's own line named neither
    assert line == ("train.steps=${oops} is not allowed: its interpolation does not resolve (Interpolation key "
                    "'oops' not found); train.steps must be an integer in [1, 1000000000]")


def test_a_network_key_may_take_another_keys_value_by_interpolation():
    from cli.build import build
    from cli.keys import compose_config

    cfg = compose_config([*TINY, "model.hidden=${guide.hidden}", "guide.hidden=7"])  # refused: 'not found'
    data, model, guide = build(cfg)
    assert [m.out_features for m in model.decoder if hasattr(m, "out_features")][:2] == [7, 7]


def test_a_group_set_to_an_interpolation_that_resolves_to_nothing_is_refused_naming_it():
    assert refusal("train=${oops}") == ("train is not allowed as it is set: its interpolation does not resolve "
                                        "(Interpolation key 'oops' not found)")


def test_write_run_refuses_to_replace_a_run_that_is_still_running(tmp_path):
    import json
    import subprocess
    import sys

    from analysis.report import write_run
    from guides import GaussianGuide
    from infer import fit
    from models import VAE, OneBit

    training = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / "status.json").write_text(json.dumps({"status": "running", "pid": training.pid}))
        before = snapshot(run)
        model = VAE(3, hidden=4)
        guide = GaussianGuide(model, hidden=4)
        result = fit(model, guide, OneBit(3), steps=5)
        with pytest.raises(ValueError, match=rf"the run there is still running \(pid {training.pid}\)") as err:
            write_run(run, model, guide, OneBit(3), result, {}, figures=False, overwrite=True)
        assert "\n" not in str(err.value) and snapshot(run) == before
    finally:
        training.kill()
        training.wait()


def test_an_override_hydra_cannot_parse_is_named_with_how_to_quote_it(tmp_path):
    proc = run_cli("train.resume=/tmp/a=b/c.pt", cwd=tmp_path)
    one_line_error(proc, "train.resume=/tmp/a=b/c.pt cannot be parsed", "must be quoted as a whole: "
                   "train.resume='/tmp/a=b/c.pt'")


def test_a_sweep_over_experiments_is_refused_before_any_job(tmp_path):
    proc = run_cli("-m", "+experiment=study,rate_distortion", "hydra.sweep.dir=sweep", cwd=tmp_path)
    one_line_error(proc, "sweeps experiment over several options: an experiment brings its own sweep")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("setting, line", [
    ("hydra.launcher.n_jobs=0", "hydra.launcher.n_jobs=0 is not allowed: hydra.launcher.n_jobs must be an integer"),
    ("hydra.launcher.prefer=bogus", "hydra.launcher.prefer='bogus' is not allowed"),
    ("hydra.launcher.backend=bogus", "hydra.launcher.backend='bogus' is not allowed"),
    ("+hydra.launcher.bogus=1", "hydra.launcher.bogus is not a setting of the joblib launcher"),
    ("hydra.launcher.timeout=6", "hydra.launcher.timeout=6.0 is not allowed: hydra.launcher.timeout must be null"),
], ids=["n_jobs", "prefer", "backend", "unknown", "timeout"])
def test_a_bad_joblib_launcher_setting_is_refused_before_the_sweep_starts(tmp_path, setting, line):
    proc = run_cli("-m", "hydra/launcher=joblib", *TINY, "seed=0,1", setting, "hydra.sweep.dir=sweep", cwd=tmp_path)
    one_line_error(proc, line)
    assert not (tmp_path / "sweep").exists()


def test_a_setting_the_basic_launcher_does_not_have_is_refused_before_the_sweep_starts(tmp_path):
    proc = run_cli("-m", *TINY, "seed=0,1", "+hydra.launcher.foo=1", "hydra.sweep.dir=sweep", cwd=tmp_path)
    one_line_error(proc, "hydra.launcher.foo is not a setting of the basic launcher (it has none)")
    assert not (tmp_path / "sweep").exists()


SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def submitit_config(**settings):
    """A composed config's hydra node as hydra/launcher=submitit_local makes it (LocalQueueConf's defaults)."""
    from omegaconf import OmegaConf

    launcher = {"_target_": SUBMITIT_LOCAL, "submitit_folder": "/tmp/onebit-sweep/.submitit/%j", "timeout_min": 60,
                "cpus_per_task": None, "gpus_per_node": None, "tasks_per_node": 1, "mem_gb": None, "nodes": 1,
                "name": "run", "stderr_to_stdout": False}
    return OmegaConf.create({"hydra": {"launcher": {**launcher, **settings}}})


def test_the_submitit_launchers_defaults_pass():
    from cli.launcher import check_launcher

    check_launcher(submitit_config())


@pytest.mark.parametrize("settings, line", [
    ({"timeout_min": 0}, "hydra.launcher.timeout_min=0 is not allowed: hydra.launcher.timeout_min must be an integer >= 1"),
    ({"tasks_per_node": 2}, "hydra.launcher.tasks_per_node=2 is not allowed: hydra.launcher.tasks_per_node must be 1"),
    ({"nodes": 0}, "hydra.launcher.nodes=0 is not allowed: hydra.launcher.nodes must be 1"),
    ({"mem_gb": -5}, "hydra.launcher.mem_gb=-5 is not allowed"),
    ({"foo": 1}, "hydra.launcher.foo is not a setting of the submitit_local launcher (it has submitit_folder,"),
    ({"submitit_folder": "/proc/nope/%j"}, "hydra.launcher.submitit_folder='/proc/nope/%j' is not allowed: "
                                            "/proc/nope cannot be created"),
], ids=["timeout_min", "tasks_per_node", "nodes", "mem_gb", "unknown", "folder"])
def test_a_bad_submitit_launcher_setting_is_refused_in_one_line(settings, line):
    from cli.launcher import check_launcher
    from cli.state import ConfigError

    with pytest.raises(ConfigError) as err:
        check_launcher(submitit_config(**settings))
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def gpu_config(kind="LocalLauncher", device="cpu", **settings):
    config = submitit_config(**settings)
    config.hydra.launcher._target_ = SUBMITIT_LOCAL.replace("LocalLauncher", kind)
    config.device = device
    return config


@pytest.fixture
def cuda_devices(monkeypatch):
    """This machine as one with `n` CUDA devices (set(n))."""
    import torch

    def cuda(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return cuda


@pytest.mark.parametrize("kind, device, settings, jobs, line", [
    ("LocalLauncher", "cuda", {}, None, "device=cuda is not allowed with hydra.launcher.gpus_per_node=null: submitit "
                                        "gives a job only the GPUs it asks for"),
    ("SlurmLauncher", "cuda:1", {"gpus_per_node": 1}, None, "device=cuda:1 is not allowed with "
                                                            "hydra.launcher.gpus_per_node=1"),
    ("LocalLauncher", "cpu", {"gpus_per_node": 1}, None, "hydra.launcher.gpus_per_node=1 is not allowed with "
                                                         "device=cpu: every job would hold 1 GPU(s) it never uses"),
    ("LocalLauncher", "cpu", {}, [["seed=0", "device=cpu"], ["seed=0", "device=cuda"]],
     "device=cuda is not allowed with hydra.launcher.gpus_per_node=null"),
    ("LocalLauncher", "cpu", {}, [["seed=0", "device='cuda:1'"]],
     "device=cuda:1 is not allowed with hydra.launcher.gpus_per_node=null"),
    ("LocalLauncher", "cuda", {"gpus_per_node": 3}, None, "hydra.launcher.gpus_per_node=3 is not allowed here: this "
                                                          "machine has 2 CUDA device(s)"),
], ids=["cuda_without_gpus", "index_past_the_gpus", "gpus_for_cpu_jobs", "a_swept_cuda_job", "a_quoted_device",
        "more_than_the_machine"])
def test_gpus_that_do_not_fit_the_jobs_devices_are_refused_in_one_line(cuda_devices, kind, device, settings, jobs,
                                                                       line):
    from cli.launcher import check_gpus
    from cli.state import ConfigError

    cuda_devices(2)
    with pytest.raises(ConfigError) as err:
        check_gpus(gpu_config(kind, device, **settings), jobs)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind, device, settings", [
    ("LocalLauncher", "cpu", {}), ("LocalLauncher", "cuda:1", {"gpus_per_node": 2}),
    ("SlurmLauncher", "cuda", {"gpus_per_node": 1}), ("SlurmLauncher", "cuda", {"gres": "gpu:1"}),
    ("JoblibLauncher", "cpu", {"gpus_per_node": 1})])
def test_gpus_that_fit_the_jobs_devices_pass(cuda_devices, kind, device, settings):
    from cli.launcher import check_gpus

    cuda_devices(2)
    check_gpus(gpu_config(kind, device, **settings))


def test_the_slurm_launcher_is_refused_where_there_is_no_sbatch(monkeypatch):
    import shutil

    from cli.launcher import check_launcher
    from cli.state import ConfigError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    config = submitit_config()
    config.hydra.launcher._target_ = SUBMITIT_LOCAL.replace("LocalLauncher", "SlurmLauncher")
    with pytest.raises(ConfigError, match="submitit_slurm is not allowed here: SLURM's sbatch is not on PATH"):
        check_launcher(config)


def test_a_launcher_setting_of_the_wrong_type_is_named_with_what_it_allows():
    from cli.keys import composition_error

    err = composition_error(ValueError("Error merging override hydra.launcher.cpus_per_task=abc"))
    assert str(err) == ("hydra.launcher.cpus_per_task=abc is not allowed: hydra.launcher.cpus_per_task must be null "
                        "or an integer >= 1")


@pytest.mark.parametrize("setting, line", [
    ("hydra.sweeper.max_batch_size=0", "hydra.sweeper.max_batch_size=0 is not allowed: hydra.sweeper.max_batch_size "
                                       "must be null or an integer >= 1"),
    ("hydra.sweeper.max_batch_size=abc", "hydra.sweeper.max_batch_size=abc is not allowed"),
    ("+hydra.sweeper.foo=1", "hydra.sweeper.foo is not a setting of the basic sweeper (it has max_batch_size, params)"),
], ids=["max_batch_size", "wrong_type", "unknown"])
def test_a_bad_basic_sweeper_setting_is_refused_in_one_line_naming_it(setting, line):
    from test_optuna_sweep import sweep_config

    from cli.state import ConfigError
    from cli.sweeper import check_sweeper

    with pytest.raises(ConfigError) as err:
        check_sweeper(sweep_config(*TINY, "seed=0,1", setting))
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_a_bad_basic_sweeper_setting_exits_2_before_the_sweep_starts(tmp_path):
    proc = run_cli("-m", *TINY, "seed=0,1", "hydra.sweeper.max_batch_size=0", "hydra.sweep.dir=sweep", cwd=tmp_path)
    one_line_error(proc, "hydra.sweeper.max_batch_size=0 is not allowed")
    assert not (tmp_path / "sweep").exists()


def test_a_cuda_sweep_for_slurm_nodes_is_not_refused_on_a_submitting_host_without_a_gpu(monkeypatch):
    import torch
    from omegaconf import open_dict

    from cli.keys import compose_config
    from cli.state import ConfigError
    from cli.values import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_config(["device=cuda"], hydra_cfg=True)
    with pytest.raises(ConfigError, match="this machine has no CUDA device"):
        validate(cfg)  # a run here, or a sweep's job on this machine
    with open_dict(cfg):
        cfg.hydra.launcher = {"_target_": SUBMITIT_LOCAL.replace("LocalLauncher", "SlurmLauncher")}
    validate(cfg)  # the jobs run on the cluster's nodes, and each checks its own device there


@pytest.mark.parametrize("overrides, line", [
    (["guide=mixture", "guide.spread=1e39"], "guide.spread=1e+39 is not allowed: guide.spread must be a finite number "
                                             ">= 0 (numbers must lie within float32's range"),
    (["objective.free_bits=1e39"], "objective.free_bits=1e+39 is not allowed"),
    (["model.hidden=9223372036854775808"], "model.hidden=9223372036854775808 is not allowed: model.hidden must be an "
                                           "integer >= 1 (integers must lie within int64: at most 2**63 - 1)"),
    (["guide=flow", "guide.count_bins=9223372036854775808"], "guide.count_bins=9223372036854775808 is not allowed"),
    (["replicas=4294967295"], "replicas=4294967295 is not allowed: replicas must be an integer in [1, 1000]"),
    (["guide=flow", "guide.flows=100000"], "guide.flows=100000 is not allowed: guide.flows must be an integer in "
                                           "[1, 100]"),
    (["guide=autoiaf", "guide.num_transforms=100000"], "guide.num_transforms=100000 is not allowed"),
], ids=["float32_spread", "float32_free_bits", "int64_hidden", "int64_count_bins", "replicas", "flows",
        "num_transforms"])
def test_a_number_beyond_what_torch_or_a_run_can_hold_is_refused_before_anything_is_built(overrides, line):
    from cli.keys import compose_config
    from cli.state import ConfigError
    from cli.values import validate

    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides, hydra_cfg=True))
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_the_python_api_names_an_int64_overflow_and_a_float32_overflow():
    from guides import MixtureGuide
    from models import VAE

    with pytest.raises(ValueError, match=r"hidden=9223372036854775808 is not allowed: .*within int64"):
        VAE(5, hidden=2 ** 63)
    with pytest.raises(ValueError, match=r"spread=1e\+39 is not allowed: .*float32's range"):
        MixtureGuide(VAE(5), spread=1e39)


@pytest.mark.parametrize("name, line", [
    ("a" * 300, "that folder name is 300 bytes, and this filesystem allows at most"),
    ("/".join(["b" * 220] * 20), "the path is"),
], ids=["folder_name", "path"])
def test_a_run_dir_name_too_long_for_the_filesystem_is_refused_in_one_line(tmp_path, name, line):
    proc = run_cli(*TINY, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
    one_line_error(proc, "hydra.run.dir=", line)


# ---------------------------------------------------------------------------------------------------------------
# hydra.* keys the run's files rely on


@pytest.mark.parametrize("override, why", [
    ("hydra.job.name=../escape", "names the run's log"),  # the run wrote its log into the folder above its dir
    ("hydra.job.name=x/y", "names the run's log"),  # the run crashed (59 lines, exit 1) after its dir was made
    ("hydra.output_subdir=.hydra", "writes the run's .hydra/ files itself"),  # Hydra wrote a refused sweep job's
    ("~hydra.output_subdir", "writes the run's .hydra/ files itself"),  # .hydra/ over the run in its job dir
])
@pytest.mark.parametrize("mode", [[], ["-m", "seed=0,1"], ["--cfg", "job"]], ids=["run", "sweep", "cfg"])
def test_a_hydra_key_the_runs_files_rely_on_is_refused_in_one_line(tmp_path, override, why, mode):
    proc = run_cli(*mode[:2], *TINY, *mode[2:], override, cwd=tmp_path)
    one_line_error(proc, f"{override} is not allowed", "cannot be overridden", why)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", [["--cfg", "job"], ["--info", "config"], ["--help"]], ids=["cfg", "info", "help"])
@pytest.mark.parametrize("override, words", [
    ("hydra.nope=1", ["cannot compose the config", "hydra.nope"]),  # a traceback of 58 lines, exit 1
    ("hydra.job.chdir=maybe", ["cannot compose the config", "hydra.job.chdir=maybe"]),  # 92 lines
    ("hydra/launcher=nope", ["cannot compose the config", "hydra/launcher/nope", "joblib"]),
    ("hydra.run.dir=''", ["hydra.run.dir='' is not allowed"]),  # printed, exit 0, where a run refuses it
])
def test_hydras_print_options_check_hydras_own_keys_in_one_line(tmp_path, flag, override, words):
    proc = run_cli(*flag, *TINY, override, cwd=tmp_path)
    one_line_error(proc, *words)
    assert not list(tmp_path.iterdir())


def test_hydras_experimental_rerun_is_refused_in_one_line_without_unpickling_the_file(tmp_path):
    import pickle

    marker = tmp_path / "ran"
    payload = tmp_path / "config.pickle"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    payload.write_bytes(pickle.dumps(Payload()))  # a file not a pickle printed a traceback (EOFError), exit 1
    proc = run_cli("--experimental-rerun", str(payload), cwd=tmp_path)
    one_line_error(proc, f"--experimental-rerun {payload} is not allowed", "no config.pickle", "overrides.yaml")
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["config.pickle"]


@pytest.mark.parametrize("args", [["--shell-completion"], ["-sc", "data.n=5"], ["-sc", "query=data.n"],
                                  ["-sc", "install=nope"], ["--shell-completion=install=bash"]])
def test_shell_completion_without_its_subcommand_and_shell_is_refused_in_one_line(tmp_path, args):
    proc = run_cli(*args, cwd=tmp_path)  # Hydra's traceback (no subcommand, no such shell), exit 1; argparse's usage
    one_line_error(proc, "is not allowed", "install=<shell>", "bash, fish, zsh")
    assert not list(tmp_path.iterdir())


def test_shell_completion_with_its_subcommand_prints_the_script(tmp_path):
    proc = run_cli("-sc", "install=bash", cwd=tmp_path)
    assert proc.returncode == 0 and "hydra_bash_completion" in proc.stdout, proc.stderr


@pytest.mark.parametrize("device", ["cudax", "cuda0", "cuda:0x", "cuda:"])
def test_a_device_that_is_not_cpu_or_cuda_index_is_refused_as_malformed(device):
    # it passed the rule (any string starting 'cuda'): here 'no CUDA device', and where one exists, fit's refusal
    # after the run's dir was claimed
    assert refusal(f"device={device}").startswith(f"device={device!r} is not allowed: device must be cpu or "
                                                  "cuda[:index]")


# ---------------------------------------------------------------------------------------------------------------
# the environment


@pytest.mark.parametrize("value", ["abc", "0", "99999"])
def test_an_onebit_threads_that_is_not_a_thread_count_is_refused_in_one_line_naming_the_variable(tmp_path, value):
    # 'abc' and '0' were 'model._target_=models.VAE cannot be imported ... must be on PYTHONPATH'; 99999 segfaulted
    # (exit 139) after the run's dir was made
    import os
    import sys

    import zygote
    from conftest import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", ONEBIT_THREADS=value)
    proc = zygote.run([sys.executable, str(ROOT / "run.py"), *TINY], cwd=tmp_path, env=env, timeout=300)
    one_line_error(proc, f"ONEBIT_THREADS={value!r} is not allowed", "must be an integer >= 1 and <= 1024")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value, threads", [(None, 1), ("2", 2), (" 3 ", 3)])
def test_onebit_threads_sets_the_thread_count_the_package_sets_at_import(value, threads):
    from infer.validate import env_threads

    assert env_threads({} if value is None else {"ONEBIT_THREADS": value}) == threads
    with pytest.raises(ValueError, match=r"^ONEBIT_THREADS='-1' is not allowed: the environment variable"):
        env_threads({"ONEBIT_THREADS": "-1"})


@pytest.mark.parametrize("args, key", [
    (["hydra.run.dir=${oops}"], "hydra.run.dir"),  # omegaconf's own line: "... full_key: hydra.run.dir object_type"
    (["--cfg", "job", "hydra.run.dir=${oops}"], "hydra.run.dir"),
    (["-m", "seed=0,1", "hydra.sweep.dir=${oops}"], "hydra.sweep.dir"),
    (["-m", "seed=0,1", "hydra.sweep.subdir=${oops}"], "hydra.sweep.subdir"),  # a 100-line traceback, exit 1, and
    (["-m", "seed=0,1", "hydra.sweep.subdir=${oc.env:ONEBIT_UNSET}"], "hydra.sweep.subdir"),  # a sweep dir left
])
def test_an_output_dir_whose_interpolation_does_not_resolve_is_refused_naming_the_key(tmp_path, args, key):
    proc = run_cli(*args[:2], *TINY, *args[2:], cwd=tmp_path)
    one_line_error(proc, f"{key}=${{", "is not allowed: its interpolation does not resolve", f"{key} must")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["' '", "'\t'"])
def test_a_blank_resume_path_is_refused_as_no_path(value):
    # 'train.resume= does not exist', naming no rule
    assert refusal(f"train.resume={value}").endswith("train.resume must be null or a path to a checkpoint.pt")


@pytest.mark.parametrize("override, group", [("model@foo=vae", "model"), ("+model@foo=vae", "model"),
                                             ("+guide@bar=flow", "guide"), ("+experiment@e=study", "+experiment")])
def test_a_group_chosen_into_a_package_is_refused_naming_the_groups_options(tmp_path, override, group):
    # Hydra: 'Did you mean to override model? To append to your default list use +model@foo=vae', and then 'model
    # appears more than once in the final defaults list'
    proc = run_cli(*TINY, override, cwd=tmp_path)
    one_line_error(proc, f"{override} is not allowed", f"chosen by its name alone, {group}=<one of")
    assert not list(tmp_path.iterdir())


def test_an_unquoted_value_outside_ascii_is_named_with_how_to_quote_it(tmp_path):
    # Hydra's grammar takes non-ASCII characters only quoted; the line said only 'LexerNoViableAltException'
    proc = run_cli(*TINY, f"hydra.run.dir={tmp_path}/ünï", cwd=tmp_path)
    one_line_error(proc, "cannot be parsed", f"must be quoted as a whole: hydra.run.dir='{tmp_path}/ünï'")
    assert not list(tmp_path.iterdir())
    proc = run_cli(*TINY, f"hydra.run.dir='{tmp_path}/ünï'", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "ünï" / "metrics.json").is_file(), proc.stderr


def test_a_kl_warmup_start_without_a_warmup_is_refused_rather_than_ignored(tmp_path):
    # the run trained at beta from the first step while its config said warmup_start=0.5
    assert refusal("train.warmup_start=0.5").startswith("train.warmup_start=0.5 is not allowed with train.warmup=0: "
                                                        "the KL weight rises")
    assert refusal("train.warmup_start=0.5", "train.warmup=0").endswith("leave train.warmup_start at 0")
    from infer import fit
    from models import VAE, OneBit
    from guides import GaussianGuide

    model = VAE(3, hidden=4)
    with pytest.raises(ValueError, match=r"^warmup_start=0\.5 is not allowed with warmup=0: ") as err:
        fit(model, GaussianGuide(model, hidden=4), OneBit(3), steps=2, warmup_start=0.5)
    assert "\n" not in str(err.value)


def test_a_resume_path_that_is_a_device_is_refused_as_no_file():
    from infer.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match=r"^train\.resume=/dev/null is not a file, but a device"):  # 'does not exist'
        load_checkpoint("/dev/null", label="train.resume")


@pytest.mark.parametrize("override, hint", [
    ("hydra.runtime.output_dir=elsewhere", "name a run's dir with hydra.run.dir"),  # ran into outputs/..., exit 0
    ("hydra.runtime.choices.guide=flow", "choose an option with guide=<option>"),  # Hydra's 'Could not override'
    ("hydra.job.num=5", "name a run's dir with hydra.run.dir"),
])
def test_a_hydra_key_set_as_each_job_starts_is_refused_rather_than_dropped(tmp_path, override, hint):
    proc = run_cli(*TINY, override, cwd=tmp_path)
    one_line_error(proc, f"{override} is not allowed", "is set by Hydra as each job starts", hint)
    assert not list(tmp_path.iterdir())
