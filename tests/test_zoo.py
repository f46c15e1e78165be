"""The guide zoo: every guide x model x objective that is allowed trains with fit(); every refused one is refused
with a one-line message before training. Plus the pieces the zoo rests on (flow broadcasting, mixture gradients,
IWAE weighting, the mean-field check, the config files)."""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

from guides import (FlowGuide, GaussianGuide, GuideMismatchError, MeanFieldGuide, MixtureGuide, NormalMixture1D,
                    StructuredGuide, check_guide)
from infer import ClosedFormELBO, fit, weighted
from infer.objectives import OBJECTIVES, ObjectiveError, check_objective, make_objective
from models import DLGM, VAE, OneBit

N = 3
MODELS = {
    "vae": lambda: VAE(N, hidden=4),
    "dlgm": lambda: DLGM(N, hidden=4, prior_hidden=4),
    "dlgm3": lambda: DLGM(N, depth=3, hidden=4, prior_hidden=4),
}
GUIDES = {
    "gaussian": lambda m: GaussianGuide(m, hidden=4),
    "structured": lambda m: StructuredGuide(m, hidden=4, upper_hidden=4),
    "meanfield": lambda m: MeanFieldGuide(m, hidden=4),
    "flow": lambda m: FlowGuide(m, hidden=4, count_bins=4),
    "mixture": lambda m: MixtureGuide(m, components=2, hidden=4, upper_hidden=4),
    "autonormal": lambda m: AutoNormal(m),
    "autoiaf": lambda m: AutoIAFNormal(m, hidden_dim=[8]),  # hidden >= the joint latent size (2 points x 3)
}
GUIDE_MISMATCH = "guide does not fit the model"
MEANFIELD = r"meanfield_elbo is not valid for this guide: z\d is a model parent of z\d but a guide descendant"
JOINT = "objective iwae needs a guide that factorises over the 'data' plate"


def refusal(guide: str, model: str, objective: str):
    """The start of the message a refused combination gives, or None if it is allowed."""
    if guide == "gaussian" and model != "vae":
        return GUIDE_MISMATCH
    if objective == "meanfield_elbo" and (guide == "structured" and model != "vae" or
                                          guide == "mixture" and model == "dlgm3"):
        return MEANFIELD  # a Gaussian q(z_l|z_{l-1}) whose model parent z_{l+1} is drawn after it
    if objective == "iwae" and guide == "autoiaf":
        return JOINT
    return None


# objective=exact trains the model alone (no guide): tests/test_marginal.py
COMBOS = [(g, m, o) for g in GUIDES for m in MODELS for o in OBJECTIVES if o != "exact"]


@pytest.mark.parametrize("guide_name, model_name, objective", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_allowed_combination_trains_and_every_other_is_refused(guide_name, model_name, objective):
    model = MODELS[model_name]()
    guide = GUIDES[guide_name](model)
    elbo = make_objective(objective, 4)
    expected = refusal(guide_name, model_name, objective)
    if expected is not None:
        with pytest.raises((GuideMismatchError, ObjectiveError), match=expected) as err:
            fit(model, guide, OneBit(N), elbo=elbo, steps=5, log_every=5)
        assert "\n" not in str(err.value)
        return
    result = fit(model, guide, OneBit(N), elbo=elbo, steps=5, log_every=5, lr=1e-2)
    row = result.last
    assert row["step"] == 5 and math.isfinite(row["loss"]) and math.isfinite(row["objective"])
    assert {f"rate_{s}" for s in model.latent_sites} <= set(row)


@pytest.mark.parametrize("objective", ["elbo", "meanfield_elbo", "iwae"])
def test_free_bits_and_quasi_random_noise_are_refused_by_pyros_objectives(objective):
    with pytest.raises(ObjectiveError, match=f"free_bits=0.5 is not allowed with objective {objective}"):
        make_objective(objective, 4, free_bits=0.5)
    with pytest.raises(ObjectiveError, match=f"noise='lattice' is not allowed with objective {objective}"):
        make_objective(objective, 4, noise="lattice")
    make_objective("closed_form", 4, free_bits=0.5, noise="lattice")
    with pytest.raises(ObjectiveError, match="name='jit_meanfield' is not allowed"):
        make_objective("jit_meanfield", 4)


def test_a_structured_free_mean_field_guide_in_any_order_passes_the_mean_field_check():
    model = DLGM(N, hidden=4, prior_hidden=4)
    net1, net2 = torch.nn.Linear(N, 2), torch.nn.Linear(N, 2)

    def guide(x):  # z1 first, then z2, but z2 does not depend on z1: Pyro's condition holds
        pyro.module("g", torch.nn.ModuleList([net1, net2]))
        with pyro.plate("data", x.shape[-2]):
            for site, net in (("z1", net1), ("z2", net2)):
                loc, raw = net(x).chunk(2, -1)
                pyro.sample(site, dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1))

    check_objective("meanfield_elbo", model, guide, OneBit(N).x)
    fit(model, guide, OneBit(N), elbo=make_objective("meanfield_elbo", 4), steps=3, log_every=3)


def test_the_flow_guide_broadcasts_over_vectorised_particles():
    data = OneBit(N)
    for model in (VAE(N, hidden=4), DLGM(N, depth=3, hidden=4, prior_hidden=4)):
        guide = FlowGuide(model, hidden=4)
        with pyro.plate("particles", 7, dim=-2):
            trace = poutine.trace(guide).get_trace(data.x)
        for site in model.latent_sites:
            node = trace.nodes[site]
            assert node["value"].shape == (7, 2, model.latent_dim)
            assert node["fn"].log_prob(node["value"]).shape == (7, 2)
        elbo = ClosedFormELBO(num_particles=7, noise="lattice")
        terms = elbo.particle_terms(weighted(model, data), weighted(guide, data), data.x)
        assert all(v.shape == (7,) for v in terms.values())


def test_the_1d_mixture_has_the_exact_pathwise_gradient():
    torch.manual_seed(0)
    locs = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    scales = torch.tensor([0.5, 1.0, 0.3], requires_grad=True)
    logits = torch.tensor([0.2, -0.3, 0.5], requires_grad=True)

    def f(z):
        return torch.sin(2 * z) + z ** 2

    q = NormalMixture1D(locs, scales, logits)
    z = q.rsample((200_000,))
    assert z.shape == (200_000, 1) and q.log_prob(z).shape == (200_000,)
    sampled = torch.autograd.grad(f(z).mean(), [locs, scales, logits])
    nodes, w = np.polynomial.hermite_e.hermegauss(80)
    nodes, w = torch.tensor(nodes, dtype=torch.float32), torch.tensor(w / math.sqrt(2 * math.pi), dtype=torch.float32)
    exact = sum(p * (w * f(m + s * nodes)).sum() for p, m, s in zip(logits.softmax(-1), locs, scales))
    for a, b in zip(sampled, torch.autograd.grad(exact, [locs, scales, logits])):
        assert torch.allclose(a, b, atol=0.02), (a, b)


def test_iwae_keeps_the_data_weights_outside_the_log_mean_exp():
    model = VAE(N, hidden=4)
    guide = GaussianGuide(model, hidden=4)
    data = OneBit(N, (0.3, 0.7))
    iwae = make_objective("iwae", 8)
    pyro.set_rng_seed(1)
    log_w, weight = iwae.particle_log_weights(weighted(model, data), weighted(guide, data), data.x)
    pyro.set_rng_seed(1)
    raw, _ = iwae.particle_log_weights(model, guide, data.x)
    assert torch.allclose(log_w, raw, atol=1e-5) and torch.allclose(weight, data.w)
    pyro.set_rng_seed(1)
    loss = iwae.loss(weighted(model, data), weighted(guide, data), data.x)
    bound = (torch.logsumexp(raw, 0) - math.log(8)).detach()
    assert loss == pytest.approx(float(-(data.w * bound).sum()), abs=1e-5)


def test_a_joint_guide_needs_equal_data_weights():
    model = VAE(N, hidden=4)
    with pytest.raises(ValueError, match="'_AutoIAFNormal_latent' lies outside the 'data' plate"):
        fit(model, AutoIAFNormal(model, hidden_dim=[4]), OneBit(N, (0.3, 0.7)), elbo=make_objective("elbo", 4),
            steps=2)


def _in_plate(shape):
    def guide(x):
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(torch.zeros(shape), 1.0).to_event(1))
    return guide


def _outside_plate(x):
    pyro.sample("z", dist.Normal(torch.zeros(2, 1), 1.0).to_event(1))


def _no_argument():
    pass


@pytest.mark.parametrize("guide, message", [
    (_outside_plate, "guide site 'z' is in plates none; the model samples it in plates"),
    (_in_plate((3, 2, 1)), r"guide site 'z' has shape \(3, 2, 1\)"),
    (_no_argument, r"guide\(x\) failed on data of shape \(2, 3\): TypeError"),
])
def test_wrong_guides_fail_early_with_one_line(guide, message):
    with pytest.raises(GuideMismatchError, match=message) as err:
        check_guide(VAE(N), guide, OneBit(N).x)
    assert "\n" not in str(err.value)


def test_every_guide_and_objective_config_builds():
    from hydra import compose, initialize_config_dir

    import run
    from conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for guide in sorted(p.stem for p in (ROOT / "conf" / "guide").glob("*.yaml")):
            for model in ("vae", "dlgm"):
                if (guide, model) == ("gaussian", "dlgm"):
                    continue
                cfg = compose("config", overrides=[f"guide={guide}", f"model={model}", "data.n=3"])
                run.validate(cfg)
                _, m, g = run.build(cfg)
                check_guide(m, g, OneBit(3).x)
        for objective in sorted(p.stem for p in (ROOT / "conf" / "objective").glob("*.yaml")):
            cfg = compose("config", overrides=[f"objective={objective}"])
            run.validate(cfg)
            built = run.build_objective(cfg)
            if objective == "exact":  # the model's exact likelihood: no guide, no particles
                assert built.needs_guide is False
                continue
            assert built.num_particles == (16 if objective == "iwae" else cfg.train.num_particles)
        cfg = compose("config", overrides=["objective=iwae", "objective.free_bits=0.5"])
        with pytest.raises(run.ConfigError, match=r"^objective.free_bits=0.5 is not allowed with objective iwae"):
            run.build_objective(cfg)
