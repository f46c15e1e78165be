import pytest
import torch
from pyro.infer import Trace_ELBO

from guides import MeanFieldGuide, StructuredGuide
from infer import ClosedFormELBO, weighted
from models import DLGM, VAE, OneBit
from guides import GaussianGuide


def estimate(elbo, model, guide, data):
    with torch.no_grad():
        terms = elbo.particle_terms(weighted(model, data), weighted(guide, data), data.x)
    total = sum(terms.values()).double()
    return float(total.mean()), float(total.std() / len(total) ** 0.5), terms


@pytest.mark.parametrize("make", [lambda: (VAE(5), GaussianGuide), lambda: (DLGM(5), StructuredGuide),
                                  lambda: (DLGM(5), MeanFieldGuide)])
@pytest.mark.parametrize("closed_form, noise", [(True, "mc"), (True, "qmc"), (False, "qmc")])
def test_every_estimator_agrees_with_trace_elbo_in_expectation(make, closed_form, noise):
    model, guide_class = make()
    guide, data = guide_class(model), OneBit(5)
    ours, se, _ = estimate(ClosedFormELBO(num_particles=20000, closed_form=closed_form, noise=noise), model, guide, data)
    reference = Trace_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        theirs = reference.loss(weighted(model, data), weighted(guide, data), data.x)
    assert abs(ours - theirs) < 5 * se + 5e-3


def test_the_vae_kl_is_exact_so_it_has_no_sampling_spread():
    model = VAE(5)
    _, _, terms = estimate(ClosedFormELBO(num_particles=100), model, GaussianGuide(model), OneBit(5))
    # per particle the same number up to float32 rounding of the lattice weight it is scaled by (a few ulps)
    assert terms["kl_z"].std() <= 4 * torch.finfo(torch.float32).eps * terms["kl_z"].abs().mean()


def test_the_structured_dlgm_kl2_is_closed_form_but_kl1_is_sampled():
    model = DLGM(5)
    elbo = ClosedFormELBO(num_particles=100)
    _, _, terms = estimate(elbo, model, StructuredGuide(model), OneBit(5))
    parents = next(iter(elbo._parents.values()))
    assert parents["z1"] == {"z2"} and parents["z2"] == set()
    assert terms["kl_z1"].std() > 0


def test_closed_forms_lower_the_variance_of_the_loss():
    model = VAE(5)
    guide, data = GaussianGuide(model), OneBit(5)
    _, se_closed, _ = estimate(ClosedFormELBO(num_particles=4000), model, guide, data)
    _, se_sampled, _ = estimate(ClosedFormELBO(num_particles=4000, closed_form=False), model, guide, data)
    assert se_closed < se_sampled


def test_sobol_noise_covers_the_noise_space_evenly():
    model = VAE(5)
    guide, data = GaussianGuide(model), OneBit(5)
    elbo = ClosedFormELBO(num_particles=256, noise="qmc")
    model_trace, guide_trace = elbo._get_vectorized_trace(weighted(model, data), weighted(guide, data), (data.x,), {})
    fn = guide_trace.nodes["z"]["fn"].base_dist
    u = torch.special.ndtr((guide_trace.nodes["z"]["value"] - fn.loc) / fn.scale)[:, 0, 0]
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert counts.tolist() == [16.0] * 16


def test_unknown_noise_is_refused():
    with pytest.raises(ValueError, match="noise must be one of mc, qmc"):
        ClosedFormELBO(num_particles=4, noise="sobol")
