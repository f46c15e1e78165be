import pyro
import pytest
import torch
from pyro import poutine

from guides import GaussianGuide, MeanFieldGuide, StructuredGuide
from models import DLGM, VAE, OneBit


def sample_sites(fn, x):
    trace = poutine.trace(fn).get_trace(x)
    return {name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not name.startswith("data")}


def test_vae_sites_are_z_and_x_with_one_row_per_data_point():
    sites = sample_sites(VAE(4), OneBit(4).x)
    assert list(sites) == ["z", "x"]
    assert sites["z"]["value"].shape == (2, 1) and sites["x"]["is_observed"]


def test_dlgm_samples_z2_then_z1_then_observes_x():
    sites = sample_sites(DLGM(4), OneBit(4).x)
    assert list(sites) == ["z2", "z1", "x"]
    assert sites["z2"]["value"].shape == sites["z1"]["value"].shape == (2, 1)


def test_deeper_dlgm_chains_its_layers_from_the_top():
    assert list(sample_sites(DLGM(4, depth=3), OneBit(4).x)) == ["z3", "z2", "z1", "x"]


def test_vae_latent_dim_sets_the_event_shape_of_z():
    assert sample_sites(VAE(4, latent_dim=3), OneBit(4).x)["z"]["fn"].event_shape == (3,)


def test_models_broadcast_over_leading_batch_dims():
    x = OneBit(4).x
    grid = torch.linspace(-3, 3, 11).reshape(11, 1, 1).expand(11, 2, 1)
    trace = poutine.trace(poutine.condition(DLGM(4), data={"z2": grid, "z1": grid})).get_trace(x)
    assert trace.nodes["x"]["fn"].log_prob(x).shape == (11, 2)


@pytest.mark.parametrize("make, sites", [(lambda m: GaussianGuide(m), ["z"]),
                                         (lambda m: StructuredGuide(m), ["z1", "z2"]),
                                         (lambda m: MeanFieldGuide(m), ["z2", "z1"])])
def test_guides_sample_their_sites_with_the_models_shapes(make, sites):
    model = VAE(4) if sites == ["z"] else DLGM(4)
    got = sample_sites(make(model), OneBit(4).x)
    assert list(got) == sites
    assert all(s["value"].shape == (2, 1) and s["fn"].has_rsample for s in got.values())


def test_structured_guide_conditions_z2_on_z1():
    model = DLGM(4)
    guide = StructuredGuide(model)
    x = OneBit(4).x
    a = poutine.trace(poutine.condition(guide, data={"z1": torch.full((2, 1), -5.0)})).get_trace(x)
    b = poutine.trace(poutine.condition(guide, data={"z1": torch.full((2, 1), 5.0)})).get_trace(x)
    assert not torch.allclose(a.nodes["z2"]["fn"].mean, b.nodes["z2"]["fn"].mean)


def test_model_params_register_in_the_param_store_under_model():
    VAE(3)(OneBit(3).x)
    assert any(name.startswith("model$$$decoder") for name in pyro.get_param_store().keys())
