import pyro
import pyro.distributions as dist
import pytest
import torch

from guides import GaussianGuide, GuideMismatchError, StructuredGuide, check_guide
from models import DLGM, VAE, OneBit


def test_a_guide_with_the_models_sites_passes_the_check():
    check_guide(DLGM(3), StructuredGuide(DLGM(3)), OneBit(3).x)


def test_the_1_layer_guide_on_the_dlgm_names_missing_and_extra_sites():
    with pytest.raises(GuideMismatchError) as err:
        check_guide(DLGM(3), GaussianGuide(VAE(3)), OneBit(3).x)
    message = str(err.value)
    assert "missing z2, z1" in message and "extra z" in message and "\n" not in message


def test_a_guide_with_the_wrong_event_shape_is_refused():
    def guide(x):
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(torch.zeros(2, 3), 1.0).to_event(1))

    with pytest.raises(GuideMismatchError, match="site 'z' has shape"):
        check_guide(VAE(3), guide, OneBit(3).x)


def test_a_guide_without_reparameterisation_is_refused():
    def guide(x):
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(torch.zeros(2, 1), 1.0).to_event(1))
            pyro.sample("k", dist.Bernoulli(0.5))

    def model(x):
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(torch.zeros(2, 1), 1.0).to_event(1))
            pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(GuideMismatchError, match="'k' .* is not reparameterisable"):
        check_guide(model, guide, OneBit(3).x)


def test_a_point_mass_guide_is_refused_because_its_elbo_bounds_nothing():
    from pyro.infer.autoguide import AutoDelta

    model = DLGM(3)
    with pytest.raises(GuideMismatchError, match="site 'z2' is a point mass") as err:
        check_guide(model, AutoDelta(model), OneBit(3).x)
    assert "\n" not in str(err.value)


def test_a_model_and_guide_given_the_wrong_way_round_are_refused():
    model = VAE(3)
    with pytest.raises(GuideMismatchError, match="look swapped") as err:
        check_guide(GaussianGuide(model), model, OneBit(3).x)
    assert "\n" not in str(err.value)


def test_a_laplace_guide_is_refused_because_its_latent_is_a_point_mass():
    from pyro.infer.autoguide import AutoLaplaceApproximation

    model = VAE(3)
    with pytest.raises(GuideMismatchError, match="is a point mass"):
        check_guide(model, AutoLaplaceApproximation(model), OneBit(3).x)


def test_a_masked_guide_site_is_refused_its_loss_would_bound_nothing():
    import pyro
    import pyro.distributions as dist

    from guides.check import check_guide
    from models import VAE, OneBit

    def masked(x):
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[-2], 1), 1.0).to_event(1).mask(False))

    with pytest.raises(ValueError, match="guide site 'z' is masked"):
        check_guide(VAE(5, hidden=8), masked, OneBit(5).x)


def test_a_guide_that_fails_with_vectorised_particles_is_refused_in_one_line_before_training():
    import pyro
    import pyro.distributions as dist

    from guides.check import check_guide
    from models import VAE, OneBit

    def one_particle(x):  # reshapes as if each data point had one draw
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[-2], 1), 1.0).to_event(1)).view(2, 1)

    with pytest.raises(ValueError, match=r"^guide\(x\) failed .* with 2 vectorised particles .*: RuntimeError: "
                                         r"shape '\[2, 1\]' is invalid") as err:
        check_guide(VAE(5, hidden=8), one_particle, OneBit(5).x)
    assert "\n" not in str(err.value)


def test_draws_the_model_cannot_take_are_refused_in_one_line_naming_the_model_on_the_guides_draws():
    import pyro
    import pyro.distributions as dist

    from guides.check import check_guide
    from models import VAE, OneBit

    def infinite(x):
        with pyro.plate("data", x.shape[-2]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[-2], 1), float("inf")).to_event(1))

    with pytest.raises(ValueError, match=r"^model\(x\) failed .* on the guide's draws\): ValueError") as err:
        check_guide(VAE(5, hidden=8), infinite, OneBit(5).x)
    assert "\n" not in str(err.value)


def _normal_z(x, loc=0.0):
    import pyro
    import pyro.distributions as dist

    return pyro.sample("z", dist.Normal(torch.zeros(x.shape[-2], 1) + loc, 1.0).to_event(1))


def test_a_guide_that_subsamples_the_data_plate_is_refused_as_subsampling_not_as_scaled():
    def subsampled(x):
        with pyro.plate("data", 2, subsample_size=1):
            pyro.sample("z", dist.Normal(torch.zeros(1, 1), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"guide plate 'data' subsamples 1 of its 2 elements"):
        check_guide(VAE(3), subsampled, OneBit(3).x)


def test_a_scaled_guide_site_is_refused_its_loss_would_bound_nothing():
    import pyro
    from pyro import poutine

    from guides.check import check_guide
    from models import VAE, OneBit

    def scaled(x):
        with pyro.plate("data", x.shape[-2]), poutine.scale(scale=2.0):
            _normal_z(x)

    with pytest.raises(ValueError, match=r"guide site 'z' is scaled \(poutine.scale, scale=2\)"):
        check_guide(VAE(3), scaled, OneBit(3).x)


def test_an_auxiliary_site_beside_a_latent_with_its_own_density_is_refused():
    import pyro
    import pyro.distributions as dist

    from guides.check import check_guide
    from models import VAE, OneBit

    def auxiliary(x):
        with pyro.plate("data", x.shape[-2]):
            u = pyro.sample("u", dist.Normal(torch.zeros(x.shape[-2], 1), 1.0).to_event(1),
                            infer={"is_auxiliary": True})
            _normal_z(x, 0.1 * u)

    with pytest.raises(ValueError, match=r"guide site 'u' is auxiliary .* every latent site \(z\) has a density of its own"):
        check_guide(VAE(3), auxiliary, OneBit(3).x)


def test_a_deterministic_guide_site_is_named_as_such():
    import pyro

    from guides.check import check_guide
    from models import VAE, OneBit

    def derived(x):
        with pyro.plate("data", x.shape[-2]):
            z = _normal_z(x)
            pyro.deterministic("z_sq", z ** 2, event_dim=1)

    with pytest.raises(ValueError, match=r"guide site 'z_sq' is a pyro.deterministic"):
        check_guide(VAE(3), derived, OneBit(3).x)
