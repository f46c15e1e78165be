"""Bad input to the Python API is refused before any work, in one line naming the argument (review s6/api, F2 F5-F9
F11 F12): the evaluation functions run evaluate()'s checks, fit and fit_replicas refuse what would fail later (or
write where it should not), and fit's checkpoint_every=0 means "only at the end", as on the command line."""
import json
import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from guides import FlowGuide, GaussianGuide, MeanFieldGuide, MixtureGuide, StructuredGuide
from infer import ClosedFormELBO, fit
from infer.fit_replicas import fit_replicas
from models import VAE, OneBit

N = 3


def one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    return err.value


@pytest.fixture
def vae():
    model = VAE(N, hidden=4)
    return model, GaussianGuide(model, hidden=4), OneBit(N)


def fit_with(model, guide, **kwargs):
    kwargs.setdefault("steps", 3)
    data = kwargs.pop("data", OneBit(N))
    return fit(model, guide, data, elbo=kwargs.pop("elbo", ClosedFormELBO(num_particles=4)), **kwargs)


def site_guide(name="z", loc=0.0, width=1):
    """q(<name>|x) = N(loc, 1) with `width` scalars per point, in the data plate."""
    def guide(x):
        with pyro.plate("data", 2):
            pyro.sample(name, dist.Normal(torch.full((2, width), loc), 1.0).to_event(1))
    return guide


def evaluation_functions():
    from analysis.exact import evidence, exact, posterior_grid, surgery
    from analysis.iwae import iwae
    from analysis.montecarlo import monte_carlo
    from analysis.psis import khat

    return {"exact": exact, "surgery": surgery, "evidence": evidence, "posterior_grid": posterior_grid,
            "monte_carlo": lambda m, g, d: monte_carlo(m, g, d, samples=64, replicates=4),
            "iwae": lambda m, g, d: iwae(m, g, d, K=(1, 4), samples=64, nll_samples=64),
            "khat": lambda m, g, d: khat(m, g, d, samples=200)}


# F2: every evaluation function checks its inputs as evaluate() does

@pytest.mark.parametrize("name", list(evaluation_functions()))
def test_an_evaluation_function_refuses_a_model_built_for_another_n(name, vae):
    model, guide, _ = vae
    one_line_value_error(lambda: evaluation_functions()[name](model, guide, OneBit(N + 1)),
                         f"model was built for n={N} but the data have n={N + 1}")


@pytest.mark.parametrize("name", list(evaluation_functions()))
def test_an_evaluation_function_refuses_a_guide_with_another_site_name(name, vae):
    model, _, data = vae
    one_line_value_error(lambda: evaluation_functions()[name](model, site_guide("w"), data),
                         "guide does not fit the model: missing z; extra w")


@pytest.mark.parametrize("name", ["exact", "monte_carlo"])
def test_an_evaluation_function_refuses_a_guide_of_the_wrong_event_shape(name, vae):
    model, _, data = vae
    one_line_value_error(lambda: evaluation_functions()[name](model, site_guide(width=3), data),
                         r"guide site 'z' has shape \(2, 3\) and event shape \(3,\)")


@pytest.mark.parametrize("name", ["exact", "monte_carlo"])
def test_an_evaluation_function_refuses_a_guide_that_draws_nan(name, vae):
    model, _, data = vae
    one_line_value_error(lambda: evaluation_functions()[name](model, site_guide(loc=math.nan), data),
                         "guide.*(invalid values|outside the model's support)")


@pytest.mark.parametrize("name", ["exact", "monte_carlo"])
def test_an_evaluation_function_refuses_data_that_are_not_onebit(name, vae):
    model, guide, _ = vae
    one_line_value_error(lambda: evaluation_functions()[name](model, guide, torch.zeros(2, N)),
                         r"^data=<Tensor> is not allowed: data must be the one-bit data")


def test_evaluate_checks_the_guide_once_for_all_its_estimators(vae, monkeypatch):
    import importlib

    from analysis.report import evaluate

    model, guide, data = vae
    calls = []
    module = importlib.import_module("infer.checks")
    real = module.check_guide
    monkeypatch.setattr(module, "check_guide", lambda *a: calls.append(1) or real(*a))
    evaluate(model, guide, data, samples=64, replicates=4, khat_samples=128)
    assert len(calls) == 1


# F8: evaluate's and exact's arguments, with the command line's bounds

@pytest.mark.parametrize("kwargs, name", [
    ({"tol": -1.0}, "tol"), ({"tol": math.nan}, "tol"), ({"exact": "no"}, "exact"),
    ({"khat_samples": 0}, "khat_samples"),
    ({"seed": -1}, "seed"), ({"seed": 2 ** 64}, "seed"), ({"iwae_k": 0}, "iwae_k"), ({"noise": "sobol"}, "noise"),
    ({"replicates": 1}, "replicates"),
])
def test_evaluate_refuses_a_bad_argument_in_one_line_naming_it(kwargs, name, vae):
    from analysis.report import evaluate

    one_line_value_error(lambda: evaluate(*vae, **{"samples": 64, "replicates": 4, **kwargs}),
                         rf"^{name}=.* is not allowed: {name} must be")


def test_samples_that_replicates_do_not_divide_are_refused_naming_both(vae):
    from analysis.report import evaluate

    one_line_value_error(lambda: evaluate(*vae, samples=100, replicates=16),
                         r"^samples=100 is not allowed with replicates=16: samples must be an integer multiple")


@pytest.mark.parametrize("tol", [-1.0, 0.0, math.nan, math.inf, "a", 0.0011, 10.0])
def test_exact_refuses_a_tolerance_outside_what_an_exact_number_allows(tol, vae):
    from analysis.exact import exact

    one_line_value_error(lambda: exact(*vae, tol=tol), r"^tol=.* is not allowed: tol must be a number in \(0, 0.001\] "
                                                       r"\(nats: an \[exact\] number may be off by up to this\)$")


def test_evaluate_refuses_a_tolerance_that_allows_an_error_of_whole_nats(vae):
    from analysis.report import evaluate

    one_line_value_error(lambda: evaluate(*vae, samples=64, replicates=4, tol=10.0),
                         r"^tol=10.0 is not allowed: tol must be a number in \(0, 0.001\]")


def test_iwae_refuses_fewer_samples_than_two_repeats_of_its_largest_k(vae):
    from analysis.iwae import iwae

    one_line_value_error(lambda: iwae(*vae, K=(1, 8), samples=0), r"^samples=0 is not allowed: samples must be an "
                                                                  r"integer >= 2 x the largest K = 16")


# F9: a guide with bounded support

class UniformGuide(nn.Module):
    """q(z|x_k) = Uniform(a_k, a_k + 1.5): a density with bounded support."""

    n = N

    def __init__(self):
        super().__init__()
        self.low = nn.Parameter(torch.tensor([[-2.0], [0.5]]))

    def forward(self, x):
        pyro.module("uniform_guide", self)
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Uniform(self.low, self.low + 1.5).to_event(1))


def test_exact_integrates_a_guide_with_bounded_support_and_agrees_with_monte_carlo(vae):
    from analysis.exact import exact
    from analysis.montecarlo import monte_carlo

    model, _, data = vae
    guide = UniformGuide()
    quadrature = exact(model, guide, data)
    torch.manual_seed(0)
    mc = monte_carlo(model, guide, data, samples=16384, replicates=16, noise="mc")
    assert math.isfinite(quadrature["loss"])
    assert abs(quadrature["loss"] - mc["loss"]) < 4 * mc["loss_se"]


def test_exact_refuses_a_point_mass_guide_in_one_line_before_integrating(vae):
    from pyro.infer.autoguide import AutoDelta

    from analysis.exact import exact

    model, _, data = vae
    one_line_value_error(lambda: exact(model, AutoDelta(model), data), r"guide site 'z' is a point mass \(Delta\)")


# F6: fit refuses before training

@pytest.mark.parametrize("data", [None, 5, torch.zeros(2, N)])
def test_fit_refuses_data_that_are_not_onebit(data, vae):
    model, guide, _ = vae
    one_line_value_error(lambda: fit_with(model, guide, data=data),
                         r"^data=.* is not allowed: data must be the one-bit")


@pytest.mark.parametrize("elbo", ["trace", ClosedFormELBO])
def test_fit_refuses_an_elbo_that_is_not_an_objective_instance(elbo, vae):
    one_line_value_error(lambda: fit_with(*vae[:2], elbo=elbo), r"^elbo=.* is not allowed: elbo must be an objective "
                                                                "instance")


def test_fit_refuses_a_model_that_is_not_callable(vae):
    one_line_value_error(lambda: fit_with(None, vae[1]), r"^model=None is not allowed: model must be")


@pytest.mark.parametrize("kwargs, name", [({"checkpoint_extra": "x"}, "checkpoint_extra"),
                                          ({"callback": 5}, "callback"),
                                          ({"resume": {}}, "resume"), ({"resume": "no/such/checkpoint.pt"}, "resume"),
                                          ({"seed": 2 ** 64}, "seed")])
def test_fit_refuses_a_bad_argument_before_training_naming_it(kwargs, name, vae):
    error = one_line_value_error(lambda: fit_with(*vae[:2], **kwargs), rf"^{name}=.* is not allowed: {name} must be")
    if name == "seed":
        assert "[0, 4294967295]" in str(error)


def test_fit_refuses_a_checkpoint_path_in_a_missing_folder_before_training(vae, tmp_path):
    rows = []
    one_line_value_error(lambda: fit_with(*vae[:2], checkpoint_path=tmp_path / "missing" / "ck.pt",
                                          callback=lambda step, row: rows.append(step), log_every=1),
                         r"^checkpoint_path=.* is not allowed: checkpoint_path must be a file in a folder that exists")
    assert rows == []


def test_fit_refuses_a_folder_as_its_checkpoint_path_naming_a_file_in_it(vae, tmp_path):
    one_line_value_error(lambda: fit_with(*vae[:2], checkpoint_path=tmp_path),  # it said: create its parent first
                         rf"^checkpoint_path=.* is not allowed: checkpoint_path must be a file path, and this is a "
                         rf"folder \(name a file in it, e.g. '{tmp_path / 'checkpoint.pt'}'\)")


def test_fit_resumes_from_a_checkpoint_path_as_from_the_loaded_checkpoint(vae, tmp_path):
    from infer.checkpoint import load_checkpoint

    model, guide, _ = vae
    path = tmp_path / "ck.pt"
    fit_with(model, guide, steps=4, seed=0, log_every=2, checkpoint_path=path)
    by_path = fit_with(model, guide, steps=8, log_every=2, resume=str(path), init="keep")
    by_dict = fit_with(model, guide, steps=8, log_every=2, resume=load_checkpoint(path), init="keep")
    assert [row["loss"] for row in by_path.history] == [row["loss"] for row in by_dict.history]


def saved_state(model, guide, tmp_path) -> dict:
    """The checkpoint of a 4-step fit, as load_checkpoint reads it."""
    from infer.checkpoint import load_checkpoint

    fit_with(model, guide, steps=4, seed=0, log_every=2, checkpoint_path=tmp_path / "ck.pt")
    return load_checkpoint(tmp_path / "ck.pt")


def test_fit_refuses_a_checkpoint_with_params_this_model_and_guide_lack(vae, tmp_path):
    model, guide, _ = vae
    state = saved_state(model, guide, tmp_path)
    state["params"]["decoder$$$extra.weight"] = torch.zeros(3)  # resumed silently, the param dropped
    one_line_value_error(lambda: fit_with(model, guide, steps=8, log_every=2, resume=state),
                         r"^resume: the checkpoint has params this model and guide do not "
                         r"\(decoder\$\$\$extra.weight\)")


def test_fit_refuses_a_checkpoint_whose_params_have_another_dtype(vae, tmp_path):
    model, guide, _ = vae
    state = saved_state(model, guide, tmp_path)
    state["params"] = {k: v.double() for k, v in state["params"].items()}  # rounded to float32 silently
    one_line_value_error(lambda: fit_with(model, guide, steps=8, log_every=2, resume=state),
                         r"^resume: the checkpoint's param .* is float64 but this model/guide's is float32")


def test_load_checkpoint_refuses_what_is_not_a_path():
    from infer.checkpoint import load_checkpoint

    one_line_value_error(lambda: load_checkpoint(None), r"^path=None is not allowed: path must be a checkpoint file")


# F7: checkpoint_every=0 writes the final checkpoint, as train.checkpoint_every=0 does

def test_fit_with_a_checkpoint_path_and_checkpoint_every_0_writes_the_final_checkpoint(vae, tmp_path):
    from infer.checkpoint import load_checkpoint

    path = tmp_path / "ck.pt"
    fit_with(*vae[:2], steps=5, checkpoint_path=path)
    assert load_checkpoint(path)["step"] == 5


# F5: fit_replicas

def replicas_with(**kwargs):
    models = [VAE(N, hidden=4) for _ in range(2)]
    arguments = {"models": models, "guides": [GaussianGuide(m, hidden=4) for m in models], "data": OneBit(N),
                 "seeds": [0, 1], "steps": 3, "elbo": ClosedFormELBO(num_particles=4, noise="lattice")}
    arguments.update(kwargs)
    return fit_replicas(**arguments)


def test_fit_replicas_refuses_the_same_model_object_for_two_replicas():
    model = VAE(N, hidden=4)
    one_line_value_error(lambda: replicas_with(models=[model, model],
                                               guides=[GaussianGuide(model, hidden=4) for _ in range(2)]),
                         r"^models=.* is not allowed: models must be distinct objects, one per replica")


def test_fit_replicas_refuses_the_same_guide_object_for_two_replicas():
    models = [VAE(N, hidden=4) for _ in range(2)]
    guide = GaussianGuide(models[0], hidden=4)
    one_line_value_error(lambda: replicas_with(models=models, guides=[guide, guide]),
                         r"^guides=.* is not allowed: guides must be distinct objects")


def test_fit_replicas_refuses_checkpoint_paths_given_as_a_string_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_value_error(lambda: replicas_with(checkpoint_paths="ab"),
                         r"^checkpoint_paths='ab' is not allowed: checkpoint_paths must be a list of one path per "
                         r"replica \(2\)")
    assert os.listdir(tmp_path) == []


def test_fit_replicas_refuses_checkpoint_paths_that_are_not_one_per_replica(tmp_path):
    one_line_value_error(lambda: replicas_with(checkpoint_paths=[tmp_path / "a.pt"]),
                         r"^checkpoint_paths=.* is not allowed: checkpoint_paths must be a list of one path per")


@pytest.mark.parametrize("name", ["models", "guides", "seeds"])
def test_fit_replicas_refuses_an_argument_that_is_not_a_list(name):
    model = VAE(N, hidden=4)
    single = {"models": model, "guides": GaussianGuide(model, hidden=4), "seeds": 5}[name]
    one_line_value_error(lambda: replicas_with(**{name: single}),
                         rf"^{name}=.* is not allowed: {name} must be a list with one entry per replica")


def test_fit_replicas_refuses_a_callback_that_is_not_callable():
    one_line_value_error(lambda: replicas_with(callback=5), r"^callback=5 is not allowed: callback must be a callable")


def test_fit_replicas_refuses_a_callback_that_takes_fits_arguments_not_the_replicas():
    one_line_value_error(lambda: replicas_with(callback=lambda step, row: None),
                         r"^callback=.* is not allowed: callback must be a callable callback\(replica, step, row\)")


def test_fit_replicas_takes_numpy_integer_seeds_as_the_integers_they_equal():
    import numpy as np

    results = replicas_with(seeds=[np.int64(0), np.uint32(1)])
    again = replicas_with(seeds=[0, 1])
    assert [r.history[-1]["loss"] for r in results] == [r.history[-1]["loss"] for r in again]


def test_fit_replicas_refuses_data_that_are_not_onebit():
    one_line_value_error(lambda: replicas_with(data=None), r"^data=None is not allowed: data must be the one-bit")


def test_fit_replicas_refuses_a_missing_checkpoint_folder_before_training(tmp_path):
    rows = []
    one_line_value_error(lambda: replicas_with(checkpoint_paths=[tmp_path / "no" / "a.pt", tmp_path / "no" / "b.pt"],
                                               callback=lambda r, step, row: rows.append(step), log_every=1),
                         r"^checkpoint_paths=.* is not allowed: checkpoint_paths must be a file in a folder that "
                         "exists")
    assert rows == []


# F11: metrics.json carries the seed

def test_write_run_puts_fits_seed_into_metrics_json(vae, tmp_path):
    from analysis.report import write_run

    model, guide, data = vae
    result = fit_with(model, guide, seed=7)
    write_run(tmp_path, model, guide, data, result, {"loss": 0.7}, figures=False, checkpoint=False)
    assert json.loads((tmp_path / "metrics.json").read_text())["seed"] == 7


@pytest.mark.parametrize("bad, line", [
    ({"metrics": None}, r"^metrics=None is not allowed: metrics must be the dict evaluate\(\) returns first"),
    ({"metrics": {}}, r"^metrics=\{\} is not allowed: .* which holds the headline 'loss'; this one lacks it$"),
    ({"metrics": {"loss": 0.7, "n": 7}}, r"^metrics\['n'\]=7 is not allowed: the run written here has n=3 \(from "
                                         r"its data\)"),  # metrics.json said n=7
    ({"metrics": {"loss": 0.7, "steps": 5}}, r"^metrics\['steps'\]=5 is not allowed: the run written here has "
                                             r"steps=3 \(from its result\)"),
    ({"data": None}, r"^data=None is not allowed: data must be the one-bit data"),  # AttributeError in describe
    ({"result": None}, r"^result=None is not allowed: result must be what fit\(\) returned"),
    ({"grids": 3}, r"^grids=3 is not allowed: grids must be None or the dict evaluate\(\) returns second"),
    ({"out": None}, r"^out=None is not allowed: out must be a directory's path"),
    ({"figures": "no"}, r"^figures='no' is not allowed: figures must be True or False$"),
    ({"checkpoint": 1}, r"^checkpoint=1 is not allowed: checkpoint must be True or False$"),
])
def test_write_run_refuses_arguments_that_are_not_what_fit_and_evaluate_return(vae, tmp_path, bad, line):
    from analysis.report import write_run

    model, guide, data = vae
    args = dict(out=tmp_path / "run", result=fit_with(model, guide), metrics={"loss": 0.7}, grids=None,
                figures=False, checkpoint=True, data=data)
    args.update(bad)  # TypeError and AttributeError before; {} was written as diverged ('the loss became None')
    one_line_value_error(lambda: write_run(args["out"], model, guide, args["data"], args["result"], args["metrics"],
                                           args["grids"], figures=args["figures"], checkpoint=args["checkpoint"]),
                         line)
    assert not (tmp_path / "run").exists()


# F12: constructors and functions name their bad argument

@pytest.mark.parametrize("guide_class", [GaussianGuide, StructuredGuide, MeanFieldGuide, FlowGuide, MixtureGuide])
@pytest.mark.parametrize("model", [None, "vae", VAE])
def test_a_guide_refuses_a_model_that_is_not_a_built_model(guide_class, model):
    one_line_value_error(lambda: guide_class(model), r"^model=.* is not allowed: model must be a built model")


@pytest.mark.parametrize("spread", [math.nan, math.inf, -1.0])
def test_the_mixture_guide_refuses_a_spread_that_is_not_finite_and_non_negative(spread):
    one_line_value_error(lambda: MixtureGuide(VAE(N, hidden=4), spread=spread),
                         r"^spread=.* is not allowed: spread must be a finite number >= 0")


def test_onebit_refuses_weights_none():
    one_line_value_error(lambda: OneBit(5, None), r"^weights=None is not allowed: weights must be")


@pytest.mark.parametrize("n", ["5", math.inf, math.nan])
def test_the_gaussian_optimum_refuses_an_n_that_is_not_a_finite_positive_number(n):
    from analysis.optimum import gaussian_optimum

    one_line_value_error(lambda: gaussian_optimum(n), r"^n=.* is not allowed: n must be a finite number > 0")


def test_posterior_grid_refuses_fewer_than_two_points(vae):
    from analysis.exact import posterior_grid

    one_line_value_error(lambda: posterior_grid(*vae, points=0), r"^points=0 is not allowed: points must be")


def test_iwae_refuses_an_empty_k(vae):
    from analysis.iwae import iwae

    one_line_value_error(lambda: iwae(*vae, K=()), r"^K=\(\) is not allowed: K must be an integer >= 1")


def test_khat_refuses_too_few_samples(vae):
    from analysis.psis import khat

    one_line_value_error(lambda: khat(*vae, samples=1), r"^samples=1 is not allowed: samples must be an integer >= 100")


def test_encodings_refuse_a_guide_with_another_site_name(vae):
    from analysis.encodings import encodings

    model, _, data = vae
    one_line_value_error(lambda: encodings(model, site_guide("w"), data, samples=10),
                         "guide does not fit the model: missing z; extra w")


def test_summary_lines_refuses_what_is_not_a_metrics_dict():
    from analysis.report import summary_lines

    one_line_value_error(lambda: summary_lines(None), r"^m=None is not allowed: m must be a metrics dict")


def test_summary_lines_tags_exacts_own_dict_as_exact(vae):
    from analysis.exact import exact
    from analysis.report import summary_lines

    lines = summary_lines(exact(*vae))
    assert "[exact]" in lines[1] and not any("RQMC" in line for line in lines)


def test_fit_refuses_a_checkpoint_dict_with_a_corrupt_entry_before_training(vae, tmp_path):
    from infer.checkpoint import load_checkpoint

    model, guide, _ = vae
    path = tmp_path / "ck.pt"
    fit_with(model, guide, steps=4, seed=0, log_every=2, checkpoint_path=path)
    state = {**load_checkpoint(path), "rng": None}
    error = one_line_value_error(lambda: fit_with(model, guide, steps=8, log_every=2, resume=state), r"^resume")
    assert "rng" in str(error)


def test_a_network_too_wide_to_allocate_is_refused_naming_its_width():
    one_line_value_error(lambda: VAE(N, hidden=10 ** 12),  # torch's RuntimeError before
                         r"^hidden=1000000000000 is not allowed: a network 1 -> 2 x 1000000000000 -> 3 cannot be "
                         r"allocated \(torch: (out of memory|its size overflows)\); lower hidden")


def corrupt_moments(state):
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(99)


def negative_second_moment(state):
    moments = state["optimizer"]["state"][1]
    moments["exp_avg_sq"] = torch.full_like(moments["exp_avg_sq"], -5.0)


def history_row_without_its_loss(state):
    state["history"] = [{"step": 1}]


def history_past_the_checkpoint(state):
    state["history"] = [dict(state["history"][-1], step=state["step"] + 10)]


@pytest.mark.parametrize("corrupt, line", [
    (corrupt_moments, r"optimizer state does not fit these params \(exp_avg of param 0 has shape \(99,\) where the "
                      r"param has"),
    (negative_second_moment, r"exp_avg_sq of param 1 holds negative values"),
    (history_row_without_its_loss, r"history entry row 0 has no lr"),
    (history_past_the_checkpoint, r"history entry ends at step 14, after the checkpoint's step 4"),
], ids=["moment-shape", "negative-second-moment", "history-row", "history-past-step"])
def test_fit_refuses_a_checkpoint_whose_optimizer_state_or_history_is_corrupt(vae, tmp_path, corrupt, line):
    from infer.checkpoint import load_checkpoint

    model, guide, _ = vae
    path = tmp_path / "ck.pt"
    fit_with(model, guide, steps=4, seed=0, log_every=2, checkpoint_path=path)
    state = load_checkpoint(path)
    corrupt(state)
    torch.save(state, tmp_path / "bad.pt")
    one_line_value_error(lambda: fit_with(model, guide, steps=8, log_every=2, resume=str(tmp_path / "bad.pt")), line)


def float64_guide(x):
    with pyro.plate("data", 2):
        pyro.sample("z", dist.Normal(torch.zeros(2, 1, dtype=torch.float64), 1.0).to_event(1))


def guide_observing_x(x):
    with pyro.plate("data", 2):
        pyro.sample("z", dist.Normal(torch.zeros(2, 1), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=torch.zeros(2, N)).to_event(1), obs=x)


@pytest.mark.parametrize("guide, line", [
    (float64_guide, r"^guide site 'z' draws float64 values; the model's are float32"),
    (guide_observing_x, r"^guide observes x: a guide samples only the model's latent sites, with no obs="),
], ids=["dtype", "observes-x"])
def test_fit_refuses_a_guide_of_another_dtype_or_one_that_observes_x_in_one_line(guide, line):
    one_line_value_error(lambda: fit_with(VAE(N, hidden=4), guide), line)


@pytest.mark.parametrize("change, line", [
    ({"lr": 1e-2}, r"it was trained with lr=0\.003 \(this fit: 0\.01\)"),
    ({"log_every": 3}, r"it was trained with log_every=2 \(this fit: 3\)"),
    ({"beta": 0.5}, r"it was trained with beta=1\.0 \(this fit: 0\.5\)"),
    ({"elbo": ClosedFormELBO(num_particles=8)}, r"it was trained with num_particles=4 \(this fit: 8\)"),
    ({"elbo": ClosedFormELBO(num_particles=4, free_bits=0.5)}, r"it was trained with free_bits=0\.0 \(this fit: "
                                                                r"0\.5\)"),  # trained on another objective
    ({"elbo": ClosedFormELBO(num_particles=4, closed_form=False)},
     r"it was trained with closed_form=True \(this fit: False\)"),  # as train.resume= refuses objective.* changes
    ({"seed": 1}, r"it was trained with seed=0 \(this fit: 1\)"),  # seed 0's run (its RNG), labelled seed 1
], ids=["lr", "log_every", "beta", "particles", "free_bits", "closed_form", "seed"])
def test_fit_refuses_a_resume_that_changes_what_its_checkpoint_was_trained_with(vae, tmp_path, change, line):
    model, guide, _ = vae
    path = tmp_path / "ck.pt"
    fit_with(model, guide, steps=4, seed=0, log_every=2, checkpoint_path=path)
    kwargs = {"steps": 8, "log_every": 2, **change}
    one_line_value_error(lambda: fit_with(model, guide, resume=str(path), **kwargs),
                         r"^resume is not allowed with other settings than its checkpoint's: " + line)


def test_a_resume_without_a_seed_records_its_checkpoints_seed(vae, tmp_path):
    model, guide, _ = vae
    path = tmp_path / "ck.pt"
    fit_with(model, guide, steps=4, seed=3, log_every=2, checkpoint_path=path)
    resumed = fit_with(model, guide, steps=8, log_every=2, resume=str(path))  # its RNG states are seed 3's
    assert resumed.recipe["seed"] == 3  # None: metrics.json had no seed for seed 3's run


def test_fit_warns_once_where_a_resume_changes_the_step_budget_and_so_the_lr_schedule(vae, tmp_path):
    model, guide, _ = vae
    path = tmp_path / "ck.pt"
    fit_with(model, guide, steps=4, seed=0, log_every=2, checkpoint_path=path)
    with pytest.warns(UserWarning, match=r"^steps=8 differs from the checkpoint's budget 4: the lr schedule changes"):
        fit_with(model, guide, steps=8, log_every=2, resume=str(path))


def test_a_resume_refused_for_its_params_does_not_first_warn_of_a_changed_step_budget(vae, tmp_path):
    import warnings

    model, guide, _ = vae
    path = tmp_path / "ck.pt"
    fit_with(model, guide, steps=4, seed=0, log_every=2, checkpoint_path=path)
    other = VAE(N, hidden=8)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        one_line_value_error(lambda: fit_with(other, GaussianGuide(other, hidden=4), steps=8, log_every=2,
                                              resume=str(path)), r"has shape")
    assert not [w for w in seen if "budget" in str(w.message)]


def test_a_fit_given_numpy_numbers_writes_a_checkpoint_that_resumes(vae, tmp_path):
    import numpy as np

    model, guide, _ = vae
    path = tmp_path / "ck.pt"
    fit_with(model, guide, steps=4, seed=np.int64(0), lr=np.float64(1e-3), adam_betas=(np.float64(0.9), 0.99),
             log_every=2, checkpoint_path=path)
    resumed = fit_with(model, guide, steps=4, lr=1e-3, adam_betas=(0.9, 0.99), log_every=2, resume=str(path))
    assert resumed.steps == 4


def test_a_checkpoint_whose_fit_settings_are_not_plain_values_is_refused_in_one_line(vae, tmp_path):
    from infer.checkpoint import load_checkpoint

    model, guide, _ = vae
    path = tmp_path / "ck.pt"
    fit_with(model, guide, steps=4, seed=0, log_every=2, checkpoint_path=path)
    state = load_checkpoint(path)
    state["fit"]["lr"] = torch.tensor([1.0, 2.0])
    torch.save(state, tmp_path / "bad.pt")
    one_line_value_error(lambda: fit_with(model, guide, steps=4, log_every=2, resume=str(tmp_path / "bad.pt")),
                         r"its fit entry is not a dict of the settings fit trained with")


@pytest.mark.parametrize("value", [{0.3, 0.7}, {0.3: "a", 0.7: "b"}], ids=["set", "dict"])
def test_an_unordered_pair_is_refused_where_an_ordered_one_is_asked(value):
    from infer import fit
    from models import OneBit

    with pytest.raises(ValueError, match=r"^weights=.* is not allowed"):
        OneBit(5, value)
    with pytest.raises(ValueError, match=r"^adam_betas=.* is not allowed"):
        fit(None, None, OneBit(5), adam_betas={0.9, 0.99} if isinstance(value, set) else {0.9: 1, 0.99: 2})
