"""The Python API validates like the command line: every bad argument raises ValueError before any work, in one
line that names the argument and what is allowed (infer.validate is the one table of bounds)."""
import math

import pytest

from guides import GaussianGuide
from infer import ClosedFormELBO, fit
from infer.validate import CONFIG_RULES, RULES, check
from models import DLGM, VAE, OneBit


def one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    return err.value


def fit_with(**kwargs):
    model = VAE(5, hidden=8)
    kwargs.setdefault("steps", 5)
    return fit(model, GaussianGuide(model, hidden=8), OneBit(5), elbo=ClosedFormELBO(num_particles=4), **kwargs)


@pytest.mark.parametrize("name, value", [
    ("log_every", 0), ("lr", "1e-3"), ("lr", math.inf), ("lr", math.nan), ("lr_final", math.inf),
    ("lr", -1.0), ("beta", -1), ("beta", math.inf), ("beta", math.nan), ("steps", 2.5), ("steps", True),
    ("warmup", -1), ("warmup_start", 2.0), ("adam_betas", (0.9, 1.0)), ("adam_betas", 0.9), ("seed", -1),
    ("schedule", "linear"), ("checkpoint_every", -1), ("threads", 0), ("init", "warm"), ("freeze_model", 1),
])
def test_a_bad_fit_argument_is_refused_in_one_line_naming_it(name, value):
    one_line_value_error(lambda: fit_with(**{name: value}), rf"^{name}=.* is not allowed: {name} must be")


@pytest.mark.parametrize("schedule", ["exponential", "cosine"])
def test_a_decaying_schedule_that_would_raise_the_learning_rate_is_refused(schedule):
    one_line_value_error(lambda: fit_with(lr=1e-3, lr_final=1.0, schedule=schedule),
                         rf"^lr_final=1.0 is not allowed with lr=0.001: the {schedule} schedule decays")


def test_a_constant_schedule_ignores_lr_final():
    assert fit_with(lr=1e-3, lr_final=1.0, schedule="constant").steps == 5


def test_a_model_built_for_another_n_is_refused_before_training():
    model = VAE(5, hidden=8)
    one_line_value_error(lambda: fit(model, GaussianGuide(model, hidden=8), OneBit(10), steps=5),
                         "model was built for n=5 but the data have n=10")


def test_a_guide_built_for_another_n_is_refused_before_training():
    guide = GaussianGuide(VAE(5, hidden=8), hidden=8)
    one_line_value_error(lambda: fit(VAE(10, hidden=8), guide, OneBit(10), steps=5),
                         "guide was built for n=5 but the data have n=10")


def test_a_bad_device_is_refused():
    one_line_value_error(lambda: fit_with(device="gpu7"), "device='gpu7' is not allowed")


@pytest.mark.parametrize("weights", [(math.nan, math.nan), (0.5, math.inf), (0.5, 0.6), (1.0,), "ab"])
def test_bad_data_weights_are_refused(weights):
    one_line_value_error(lambda: OneBit(5, weights), "weights=.* is not allowed: weights must be two positive")


@pytest.mark.parametrize("make, name", [
    (lambda: VAE(0), "n"), (lambda: VAE(5, latent_dim=0), "latent_dim"), (lambda: VAE(5, hidden=0), "hidden"),
    (lambda: VAE(5, layers=-1), "layers"), (lambda: VAE(5, activation="gelu"), "activation"),
    (lambda: DLGM(5, depth=1), "depth"), (lambda: DLGM(5, prior_hidden=0), "prior_hidden"),
    (lambda: DLGM(5, min_scale=0.0), "min_scale"), (lambda: DLGM(5.0), "n"),
    (lambda: GaussianGuide(VAE(5), hidden=0), "hidden"), (lambda: GaussianGuide(VAE(5), min_scale=-1), "min_scale"),
])
def test_a_bad_network_argument_is_refused(make, name):
    one_line_value_error(make, rf"^{name}=.* is not allowed: {name} must be")


@pytest.mark.parametrize("kwargs, name", [({"num_particles": 0}, "num_particles"), ({"num_particles": 2.0},
                                                                                   "num_particles"),
                                          ({"free_bits": -1.0}, "free_bits"), ({"free_bits": math.inf}, "free_bits"),
                                          ({"noise": "sobol"}, "noise")])
def test_a_bad_objective_argument_is_refused(kwargs, name):
    one_line_value_error(lambda: ClosedFormELBO(**kwargs), rf"^{name}=.* is not allowed")


def test_every_config_key_has_the_rule_of_its_argument():
    assert CONFIG_RULES["optim.lr"] is RULES["lr"] and CONFIG_RULES["data.n"] is RULES["n"]
    with pytest.raises(ValueError, match=r"^optim.lr=inf is not allowed: optim.lr must be a finite number > 0$"):
        check("lr", math.inf, label="optim.lr")


@pytest.mark.parametrize("tol", [1e-8, 1e-4, 1e-3, 1.1e-3, 10.0, 0.0])
def test_the_command_lines_eval_tol_allows_exactly_what_evaluates_tol_allows(tol):
    from cli.values import RULES as COMMAND_LINE

    assert COMMAND_LINE["eval.tol"][0](tol) == RULES["tol"][0](tol) == (0 < tol <= 1e-3)


def test_a_device_this_machine_lacks_is_refused_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_value_error(lambda: fit_with(device="cuda"), "device='cuda' is not available on this machine")


def test_evaluate_refuses_a_guide_that_does_not_fit_in_one_line():
    from analysis.report import evaluate
    from guides import StructuredGuide

    model = VAE(3, hidden=4)
    one_line_value_error(lambda: evaluate(model, StructuredGuide(DLGM(3, hidden=4, prior_hidden=4)), OneBit(3)),
                         "guide does not fit the model: missing z")


def test_evaluate_refuses_a_model_built_for_another_n_in_one_line():
    from analysis.report import evaluate

    model = VAE(5, hidden=4)
    one_line_value_error(lambda: evaluate(model, GaussianGuide(model, hidden=4), OneBit(3)),
                         "model was built for n=5 but the data have n=3")
