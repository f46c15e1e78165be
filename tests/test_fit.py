import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch

from analysis.montecarlo import monte_carlo
from guides import GaussianGuide
from infer import ClosedFormELBO, DivergenceError, fit
from infer.checkpoint import CheckpointError, load_checkpoint
from models import DLGM, VAE, OneBit


def train(steps=60, seed=0, **kwargs):
    pyro.set_rng_seed(seed)
    model = VAE(5, hidden=16)
    guide = GaussianGuide(model, hidden=16)
    result = fit(model, guide, OneBit(5), elbo=ClosedFormELBO(num_particles=16), steps=steps, log_every=10,
                 seed=seed, **kwargs)
    return model, guide, result


def test_training_lowers_the_loss():
    _, _, result = train(steps=300, lr=1e-2, lr_final=1e-3)
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.5


def test_history_has_one_row_per_logged_step_with_every_term():
    _, _, result = train(steps=60)
    assert [row["step"] for row in result.history] == [10, 20, 30, 40, 50, 60]
    assert {"loss", "recon", "rate_z", "rate", "lr"} <= set(result.history[0])


def test_a_window_trained_at_beta_0_logs_no_kl_rather_than_a_kl_of_0():
    rows = train(steps=20, beta=0.0)[2].history
    assert all(math.isnan(row["rate_z"]) and math.isnan(row["rate"]) and math.isnan(row["loss"]) for row in rows)
    assert all(row["objective"] == row["recon"] for row in rows)  # recon + 0 KL: what it trained on


def test_a_warm_up_from_beta_0_logs_the_kl_of_its_steps_whose_beta_is_positive():
    pyro.set_rng_seed(0)
    model = VAE(5, hidden=16)
    first, second = fit(model, GaussianGuide(model, hidden=16), OneBit(5), elbo=ClosedFormELBO(num_particles=16),
                        steps=4, log_every=2, warmup=100, warmup_start=0.0, lr=1e-4).history  # beta 0 at step 0 only
    assert first["rate_z"] == pytest.approx(second["rate_z"], rel=0.2)  # not halved by step 0's beta-weighted 0
    assert first["loss"] == pytest.approx(first["recon"] + first["rate"])


def test_the_same_seed_gives_the_same_numbers():
    assert train(seed=3)[2].history == train(seed=3)[2].history


def test_a_different_seed_gives_different_numbers():
    assert train(seed=3)[2].history != train(seed=4)[2].history


def test_resuming_after_a_crash_continues_exactly(tmp_path):
    full = train(steps=60)[2].history

    def crash(step, row):
        if step == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(steps=60, callback=crash, checkpoint_path=tmp_path / "c.pt", checkpoint_every=30)
    pyro.set_rng_seed(99)  # resume must restore every state itself
    model = VAE(5, hidden=16)
    guide = GaussianGuide(model, hidden=16)
    resumed = fit(model, guide, OneBit(5), elbo=ClosedFormELBO(num_particles=16), steps=60, log_every=10,
                  resume=load_checkpoint(tmp_path / "c.pt"))
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full], rel=1e-6)


def test_resuming_restores_a_guides_buffers_such_as_an_iaf_permutation(tmp_path):
    from pyro.infer.autoguide import AutoIAFNormal

    from infer.checkpoint import save_checkpoint

    def run(seed, resume=None):
        pyro.set_rng_seed(seed)
        model = VAE(5, hidden=8)
        guide = AutoIAFNormal(model, hidden_dim=[16], num_transforms=2)  # random permutations, drawn at first run
        result = fit(model, guide, OneBit(5), elbo=ClosedFormELBO(num_particles=8), steps=20,
                     seed=seed if resume is None else None, resume=resume)  # a resume continues its seed's run
        return guide, result

    guide, result = run(seed=0)
    save_checkpoint(tmp_path / "c.pt", result)
    resumed, _ = run(seed=7, resume=load_checkpoint(tmp_path / "c.pt"))
    for (name, want), (_, got) in zip(guide.named_buffers(), resumed.named_buffers()):
        assert torch.equal(want, got), name


def test_a_corrupt_checkpoint_is_refused_with_one_line(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch file") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_a_checkpoint_without_optimizer_state_is_refused(tmp_path):
    torch.save({"params": {}, "step": 3}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks optimizer, rng"):
        load_checkpoint(tmp_path / "partial.pt")


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps must be"), ({"lr": 0.0}, "lr must be a finite number > 0"),
                                             ({"schedule": "linear"}, "schedule must be")])
def test_bad_training_arguments_fail_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train(**kwargs)


def test_a_guide_written_in_a_few_lines_trains_through_the_python_api():
    data = OneBit(5)
    model = VAE(5, hidden=16)

    def guide(x):  # q(z|x_k) = N(m_k, s_k^2), one free Gaussian per data point
        m = pyro.param("m", torch.tensor([[-1.0], [1.0]]))
        s = pyro.param("s", torch.ones(2, 1), constraint=dist.constraints.positive)
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(m, s).to_event(1))

    result = fit(model, guide, data, elbo=ClosedFormELBO(num_particles=32), steps=400, lr=2e-2, lr_final=1e-3)
    metrics = monte_carlo(model, guide, data, samples=4000, replicates=4)
    assert set(metrics["kl"]) == {"z"}
    assert metrics["loss"] < 1.5 and math.isfinite(result.history[-1]["loss"])
    assert pyro.param("m")[1, 0] - pyro.param("m")[0, 0] > 1.0  # the encoder separates the two points


# --- divergence -------------------------------------------------------------------------------------------------

def vae_run(n=5, **kwargs):
    model = VAE(n, hidden=16)
    guide = GaussianGuide(model, hidden=16)
    return fit(model, guide, OneBit(n), elbo=ClosedFormELBO(num_particles=16), log_every=10, seed=0, **kwargs)


def test_a_nan_made_by_the_last_update_is_caught_as_divergence():
    with pytest.raises(DivergenceError, match="diverged at step 1: the last update") as err:
        vae_run(n=1000, lr=1e30, steps=1)
    assert "\n" not in str(err.value) and err.value.cause == "lr"


def test_a_divergence_names_its_first_bad_step_and_the_learning_rate():
    with pytest.raises(DivergenceError, match=r"diverged at step 2: .*lower lr") as err:
        vae_run(n=1000, lr=1e30, steps=300)
    assert err.value.step == 2 and "\n" not in str(err.value)


def test_a_rising_schedule_is_refused_before_training_naming_lr_final():
    # it trained, diverged, and was named by its divergence (or, finite, blamed on lr)
    with pytest.raises(ValueError, match=r"^lr_final=1e\+30 is not allowed with lr=0.003: the exponential schedule"):
        vae_run(n=100, lr=3e-3, lr_final=1e30, steps=200)


def test_a_loss_that_is_not_finite_before_any_update_does_not_blame_the_learning_rate():
    with pytest.raises(DivergenceError, match="before any update, so not the learning rate") as err, \
            pytest.warns(UserWarning, match="the general path's loss terms are not finite at these parameters"):
        vae_run(steps=20, beta=1e38 * 3)  # finite, but the weighted KL overflows float32
    assert err.value.cause == "init"


def test_a_checkpoint_is_never_written_from_parameters_that_diverged(tmp_path):
    path = tmp_path / "c.pt"
    vae_run(steps=50, lr=1e-3, checkpoint_path=path, checkpoint_every=25)  # a good checkpoint at step 50
    good = load_checkpoint(path)
    del good["fit"]  # without the settings it was trained with, a resume may change its lr: here to one that diverges
    with pytest.raises(DivergenceError):
        vae_run(steps=300, lr=1e30, checkpoint_path=path, checkpoint_every=25, resume=good)
    kept = load_checkpoint(path)
    assert all(bool(torch.isfinite(v).all()) for v in kept["params"].values())


def test_a_non_finite_step_leaves_the_parameters_of_the_last_good_step():
    model = VAE(5, hidden=16)
    guide = GaussianGuide(model, hidden=16)
    with pytest.raises(DivergenceError):
        fit(model, guide, OneBit(5), elbo=ClosedFormELBO(num_particles=16), log_every=50, seed=0, steps=50,
            lr=1e30)
    assert all(bool(torch.isfinite(p).all()) for p in [*model.parameters(), *guide.parameters()])


# --- resume -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint_every, log_every", [(50, 30), (30, 10), (25, 100)])
def test_resuming_gives_the_same_history_as_an_uninterrupted_run_to_the_last_digit(tmp_path, checkpoint_every,
                                                                                   log_every):
    def run(**kwargs):
        model = VAE(5, hidden=16)
        guide = GaussianGuide(model, hidden=16)
        return fit(model, guide, OneBit(5), elbo=ClosedFormELBO(num_particles=16, noise="lattice"), steps=120,
                   log_every=log_every, seed=0, warmup=40, **kwargs)

    full = run().history

    def crash(step, row):
        if step >= 70:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(callback=crash, checkpoint_path=tmp_path / "c.pt", checkpoint_every=checkpoint_every)
    pyro.set_rng_seed(99)  # resume must restore every state itself
    resumed = run(resume=load_checkpoint(tmp_path / "c.pt")).history
    assert resumed == full


def test_a_run_at_beta_0_resumes_to_the_history_of_an_uninterrupted_run(tmp_path):
    def run(**kwargs):
        model = VAE(5, hidden=16)
        return fit(model, GaussianGuide(model, hidden=16), OneBit(5), elbo=ClosedFormELBO(num_particles=16),
                   steps=60, log_every=10, seed=0, beta=0.0, **kwargs).history

    def crash(step, row):
        if step >= 40:
            raise KeyboardInterrupt

    full = run()
    with pytest.raises(KeyboardInterrupt):
        run(callback=crash, checkpoint_path=tmp_path / "c.pt", checkpoint_every=20)
    resumed = run(resume=load_checkpoint(tmp_path / "c.pt"))  # its rows' loss is NaN: no KL measured at beta 0
    assert [{k: str(v) for k, v in row.items()} for row in resumed] == [{k: str(v) for k, v in row.items()}
                                                                       for row in full]


def test_resuming_an_n5_checkpoint_with_n10_data_is_refused_in_one_line(tmp_path):
    vae_run(steps=20, checkpoint_path=tmp_path / "c.pt", checkpoint_every=20)
    with pytest.raises(ValueError, match="param .* has shape .* another model, guide or data.n") as err:
        vae_run(n=10, steps=40, resume=load_checkpoint(tmp_path / "c.pt"))
    assert "\n" not in str(err.value)


def test_a_step_budget_below_the_checkpoints_step_is_refused(tmp_path):
    vae_run(steps=30, checkpoint_path=tmp_path / "c.pt", checkpoint_every=30)
    with pytest.raises(ValueError, match="steps=20 is not allowed: the checkpoint is at step 30"):
        vae_run(steps=20, resume=load_checkpoint(tmp_path / "c.pt"))


def test_a_checkpoint_gets_the_file_mode_of_other_outputs(tmp_path):
    import os

    vae_run(steps=10, checkpoint_path=tmp_path / "c.pt", checkpoint_every=10)
    (tmp_path / "other").write_text("x")
    assert os.stat(tmp_path / "c.pt").st_mode & 0o777 == os.stat(tmp_path / "other").st_mode & 0o777


def test_temporary_files_of_a_killed_checkpoint_write_are_removed_at_the_next_write(tmp_path):
    orphan = tmp_path / ".c.pt.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    vae_run(steps=10, checkpoint_path=tmp_path / "c.pt", checkpoint_every=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_a_checkpoint_carries_the_extra_entries_it_is_given(tmp_path):
    from infer.checkpoint import save_checkpoint

    result = vae_run(steps=10)
    save_checkpoint(tmp_path / "c.pt", result, extra={"config": {"seed": 0}})
    assert load_checkpoint(tmp_path / "c.pt")["config"] == {"seed": 0}


# --- the Python API: threads, seeds, one recipe ------------------------------------------------------------------

def test_fit_trains_on_one_thread_and_restores_the_callers_setting():
    seen = []
    torch.set_num_threads(2)
    try:
        vae_run(steps=10, callback=lambda step, row: seen.append(torch.get_num_threads()))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_a_seed_makes_a_script_reproducible_although_the_networks_were_built_before_it():
    def script(draw_before):
        torch.manual_seed(draw_before)  # a fresh process starts from a random seed
        model = VAE(5, hidden=8)
        return fit(model, GaussianGuide(model, hidden=8), OneBit(5), steps=20, log_every=20, seed=0).history

    assert script(1) == script(2)


def test_calling_fit_twice_starts_afresh_unless_told_to_keep_the_parameters():
    model = VAE(5, hidden=8)
    guide = GaussianGuide(model, hidden=8)
    first = fit(model, guide, OneBit(5), steps=20, log_every=20, seed=0).history
    again = fit(model, guide, OneBit(5), steps=20, log_every=20, seed=0).history
    warm = fit(model, guide, OneBit(5), steps=20, log_every=20, seed=0, init="keep").history
    assert again == first and warm != first


def test_keep_starts_a_new_module_from_its_own_values_not_from_an_earlier_fits():
    earlier = VAE(5, hidden=8)
    fit(earlier, GaussianGuide(earlier, hidden=8), OneBit(5), steps=20, log_every=20, seed=1)
    model = VAE(5, hidden=8)  # e.g. loaded from a file: the same param names as the earlier fit's
    guide = GaussianGuide(model, hidden=8)
    own = [p.detach().clone() for p in (*model.parameters(), *guide.parameters())]
    fit(model, guide, OneBit(5), steps=1, log_every=1, lr=1e-30, lr_final=1e-30, init="keep")
    after = [p.detach() for p in (*model.parameters(), *guide.parameters())]
    assert all(torch.allclose(a, b, atol=1e-20) for a, b in zip(own, after))


def test_an_autoguide_is_set_up_afresh_by_each_fit():
    from pyro.infer.autoguide import AutoIAFNormal

    model = VAE(5, hidden=8)
    guide = AutoIAFNormal(model, hidden_dim=[8], num_transforms=2)
    runs = [fit(model, guide, OneBit(5), steps=10, log_every=10, seed=0).history for _ in range(2)]
    assert runs[0] == runs[1]


def test_fits_defaults_are_the_models_recipe():
    from infer import recipe

    model = VAE(5, hidden=8)
    result = fit(model, GaussianGuide(model, hidden=8), OneBit(5), steps=2, log_every=2)
    plan = recipe(model)
    assert result.recipe["num_particles"] == plan.num_particles == 32 and result.recipe["noise"] == "lattice"
    assert result.recipe["adam_betas"] == plan.betas and result.recipe["lr_final"] == plan.lr_final
    assert recipe(DLGM).lr_final == 3e-5 and recipe(DLGM).num_particles == 128 and recipe(DLGM).steps == 14000


@pytest.mark.parametrize("name", ["vae", "dlgm"])
def test_the_command_lines_recipe_is_the_recipe_fit_uses(name):
    from pathlib import Path

    import yaml

    from infer import recipe

    conf = Path(__file__).resolve().parents[1] / "conf"
    base, optim = (yaml.safe_load((conf / f).read_text()) for f in ("config.yaml", "optim/adam.yaml"))
    model = yaml.safe_load((conf / "model" / f"{name}.yaml").read_text())
    objective = yaml.safe_load((conf / "objective" / "closed_form.yaml").read_text())
    train, optim = {**base["train"], **model.get("train", {})}, {**optim, **model.get("optim", {})}
    plan = recipe({"vae": VAE, "dlgm": DLGM}[name])
    assert (train["steps"], train["num_particles"], objective["noise"], train["average"]) == (
        plan.steps, plan.num_particles, plan.noise, plan.average)
    assert (optim["lr"], optim["lr_final"], optim["schedule"], tuple(optim["betas"])) == (
        plan.lr, plan.lr_final, plan.schedule, plan.betas)


def test_fits_own_training_defaults_are_the_command_lines():
    import inspect
    from pathlib import Path

    import yaml

    train = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "config.yaml").read_text())["train"]
    defaults = inspect.signature(fit).parameters
    for key in ("beta", "warmup", "warmup_start", "log_every", "freeze_model"):  # what the recipe does not set
        assert defaults[key].default == train[key], key


# --- frozen model, and objectives without a guide -----------------------------------------------------------------

def test_freeze_model_trains_the_guide_alone():
    model = VAE(5, hidden=8)
    guide = GaussianGuide(model, hidden=8)
    fit(model, guide, OneBit(5), steps=5, log_every=5, seed=0)
    before_model = [p.detach().clone() for p in model.parameters()]
    before_guide = [p.detach().clone() for p in guide.parameters()]
    fit(model, guide, OneBit(5), steps=20, log_every=20, seed=1, init="keep", freeze_model=True)
    assert all(torch.equal(a, b) for a, b in zip(before_model, model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before_guide, guide.parameters()))


def test_freeze_model_keeps_the_trained_model_whatever_init_says():
    model = VAE(5, hidden=8)
    guide = GaussianGuide(model, hidden=8)
    fit(model, guide, OneBit(5), steps=5, log_every=5, seed=0)
    trained = [p.detach().clone() for p in model.parameters()]
    fit(model, guide, OneBit(5), steps=5, log_every=5, seed=0, freeze_model=True)  # init="reset", the default
    assert all(torch.equal(a, b) for a, b in zip(trained, model.parameters()))


def test_freeze_model_with_init_reset_draws_the_guide_afresh_from_the_seed():
    model = VAE(5, hidden=8)
    guide = GaussianGuide(model, hidden=8)
    firsts = []
    for _ in range(2):  # the guide trained in between: the second fit starts from the same draw
        fit(model, guide, OneBit(5), steps=1, log_every=1, seed=3, freeze_model=True,
            callback=lambda step, row: firsts.append(row["loss"]))
    assert firsts[0] == firsts[1]


def test_an_objective_without_a_guide_trains_the_model_by_its_nll():
    from collections import OrderedDict

    class MeanLogLikelihood:  # a stand-in for infer.marginal: -E_p(z) log p(x|z), one prior sample per point
        needs_guide = False

        def marginal_terms(self, model, data):
            from pyro import poutine
            trace = poutine.trace(model).get_trace(data.x)
            nll = -(data.w * trace.nodes["x"]["fn"].log_prob(data.x)).sum()
            return OrderedDict(nll=nll.reshape(1))

    model = VAE(5, hidden=8)
    result = fit(model, None, OneBit(5), elbo=MeanLogLikelihood(), steps=60, log_every=20, lr=1e-2, seed=0)
    assert list(result.history[0]) == ["step", "lr", "nll", "loss", "objective"]
    assert result.history[-1]["loss"] == result.history[-1]["nll"] < result.history[0]["nll"]
    with pytest.raises(ValueError, match="beta=0.5 is not allowed with objective MeanLogLikelihood"):
        fit(model, None, OneBit(5), elbo=MeanLogLikelihood(), steps=5, beta=0.5)


def test_a_missing_guide_is_refused_for_an_objective_that_needs_one():
    with pytest.raises(ValueError, match="guide=None is not allowed"):
        fit(VAE(5, hidden=8), None, OneBit(5), steps=5)


def test_a_resumed_runs_training_time_counts_the_time_before_its_checkpoint(tmp_path):
    first = vae_run(steps=30, checkpoint_path=tmp_path / "c.pt")
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["wall_seconds"] == pytest.approx(first.wall_seconds, abs=0.05)
    state["wall_seconds"] = 1000.0  # as if the first session had trained for 1000 s
    resumed = vae_run(steps=60, resume=state)
    assert 1000.0 < resumed.wall_seconds < 1000.0 + 10 * first.wall_seconds + 5


@pytest.mark.parametrize("recorded", [None, float("nan"), -1.0, "abc"])
def test_a_checkpoint_without_a_usable_training_time_resumes_counting_from_zero(tmp_path, recorded):
    from infer.fit import trained_seconds

    assert trained_seconds({"wall_seconds": recorded}) == 0.0 and trained_seconds(None) == 0.0


def test_a_run_resumed_on_another_path_names_both_paths_with_the_step_they_changed_at(tmp_path):
    first = vae_run(steps=30, checkpoint_path=tmp_path / "c.pt", engine="general")
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["engine"] == first.engine == "general"
    resumed = vae_run(steps=60, resume=state)  # auto: the fast path
    assert resumed.engine == "general to step 30, then fast"
    assert vae_run(steps=60, resume=load_checkpoint(tmp_path / "c.pt"), engine="general").engine == "general"


def test_resuming_a_finished_run_writes_its_checkpoint_which_resumes_as_the_one_it_read(tmp_path):
    vae_run(steps=30, checkpoint_path=tmp_path / "c.pt")
    again = vae_run(steps=30, resume=tmp_path / "c.pt", checkpoint_path=tmp_path / "again.pt")  # 0 steps to run
    before, after = load_checkpoint(tmp_path / "c.pt"), load_checkpoint(tmp_path / "again.pt")
    assert after["step"] == before["step"] == again.steps == 30 and after["history"] == before["history"]
    assert all(torch.equal(after["params"][k], before["params"][k]) for k in before["params"])


def test_a_resumed_finished_run_names_only_the_path_its_checkpoint_trained_on(tmp_path):
    vae_run(steps=30, checkpoint_path=tmp_path / "c.pt", engine="general")
    again = vae_run(steps=30, resume=tmp_path / "c.pt", checkpoint_path=tmp_path / "again.pt")  # auto: fast, unused
    assert again.engine == "general"
    assert load_checkpoint(tmp_path / "again.pt")["engine"] == "general"


def test_a_checkpoint_path_in_a_folder_that_cannot_be_written_is_refused_before_training():
    with pytest.raises(ValueError, match=r"checkpoint_path='/proc/x.pt' is not allowed: .*a folder this process can "
                                         r"write"):
        vae_run(steps=3000, checkpoint_path="/proc/x.pt")


@pytest.mark.parametrize("extra, words", [
    ({"step": "three"}, "checkpoint_extra may not hold 'step'"),
    ({"epoch": object()}, "checkpoint_extra['epoch']="),
], ids=["own_key", "unstorable"])
def test_checkpoint_extra_that_would_spoil_the_checkpoint_is_refused(tmp_path, extra, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        vae_run(steps=3, checkpoint_path=tmp_path / "c.pt", checkpoint_extra=extra)


def test_numpy_numbers_in_checkpoint_extra_are_stored_as_numbers_and_resume(tmp_path):
    import numpy as np

    vae_run(steps=3, checkpoint_path=tmp_path / "c.pt", checkpoint_extra={"epoch": np.int64(3)})
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["epoch"] == 3 and type(state["epoch"]) is int
    vae_run(steps=6, resume=state)


@pytest.fixture(scope="module")
def mid_window_checkpoint(tmp_path_factory):
    """A checkpoint written between two logged rows (step 225, last row at 220: a window of 5 steps)."""
    import shutil

    folder = tmp_path_factory.mktemp("window")

    def keep(step, row):
        if step == 230:
            shutil.copy(folder / "c.pt", folder / "c225.pt")

    vae_run(steps=250, checkpoint_path=folder / "c.pt", checkpoint_every=45, callback=keep)  # logs every 10 steps
    state = load_checkpoint(folder / "c225.pt")
    assert state["step"] == 225 and state["window"]["values"].shape[0] == 5
    return state


@pytest.mark.parametrize("spoil, words", [
    (lambda s: s["window"]["values"].fill_(float("nan")), "its window entry holds non-finite values"),
    (lambda s: s["window"].update(values=torch.cat([s["window"]["values"]] * 2), betas=s["window"]["betas"] * 2),
     "its window entry holds 10 steps, where the checkpoint's step 225 is 5 past the last logged row"),
    (lambda s: s["history"][-1].update(loss="abc"), "its history entry row 21's loss is 'abc', not a finite number"),
    (lambda s: s["window"].update(values=s["window"]["values"][:, :1]), "its window entry holds 1 values a step"),
], ids=["nan_window", "window_rows", "history_value", "window_width"])
def test_a_checkpoint_whose_window_or_history_is_spoiled_is_refused_in_one_line(mid_window_checkpoint, spoil, words):
    import copy

    state = copy.deepcopy(mid_window_checkpoint)
    spoil(state)
    with pytest.raises(ValueError, match=re.escape(words)):
        vae_run(steps=250, resume=state)


@pytest.mark.parametrize("keep", [lambda steps: steps == 10, lambda steps: steps != 100],
                         ids=["first_row_only", "one_row_dropped"])
def test_a_checkpoint_whose_history_lacks_a_logged_step_is_refused_in_one_line_naming_it(tmp_path, keep):
    vae_run(steps=300, checkpoint_path=tmp_path / "c.pt")  # logs every 10 steps
    state = load_checkpoint(tmp_path / "c.pt")
    state["history"] = [row for row in state["history"] if keep(row["step"])]
    torch.save(state, tmp_path / "gap.pt")
    missing = 20 if len(state["history"]) == 1 else 100
    with pytest.raises(ValueError, match=rf"^resume='.*gap.pt' is not allowed: .*its history entry has no row at "
                                         rf"step {missing}: fit logs one every log_every=10 steps") as err:
        vae_run(steps=400, resume=tmp_path / "gap.pt")
    assert "\n" not in str(err.value)


def test_a_history_with_the_partial_window_of_an_earlier_step_budget_resumes(tmp_path):
    vae_run(steps=25, checkpoint_path=tmp_path / "c25.pt")  # rows at 10, 20 and 25 (a window of 5 steps)
    vae_run(steps=40, resume=tmp_path / "c25.pt", checkpoint_path=tmp_path / "c40.pt")
    assert [row["step"] for row in vae_run(steps=50, resume=tmp_path / "c40.pt").history] == [10, 20, 25, 30, 40, 50]


def test_a_checkpoint_without_its_log_every_is_checked_against_the_log_every_of_the_fit_resuming_it(tmp_path):
    vae_run(steps=30, checkpoint_path=tmp_path / "c.pt")
    state = load_checkpoint(tmp_path / "c.pt")
    del state["fit"]  # as an older version wrote it
    vae_run(steps=40, resume=dict(state))
    state["history"] = [row for row in state["history"] if row["step"] != 20]
    with pytest.raises(ValueError, match=r"^resume: its history entry has no row at step 20: fit logs one every "
                                         r"log_every=10 steps"):
        vae_run(steps=40, resume=state)


def test_a_checkpoint_with_no_window_past_its_last_logged_row_is_refused(mid_window_checkpoint):
    with pytest.raises(ValueError, match=r"its window entry is empty, where the checkpoint's step 225 is 5 past the "
                                         r"last logged row"):
        vae_run(steps=250, resume={**mid_window_checkpoint, "window": None})


def test_a_second_resume_on_the_same_path_adds_nothing_to_the_engine():
    from infer.fit import resumed_engine

    assert resumed_engine("graph to step 280, then fast", "fast", 500) == "graph to step 280, then fast"
    assert resumed_engine("graph to step 280, then fast", "graph", 500) == ("graph to step 280, then fast to step "
                                                                            "500, then graph")
