import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from analysis.montecarlo import monte_carlo
from guides import GaussianGuide
from infer import ClosedFormELBO, fit
from infer.checkpoint import CheckpointError, load_checkpoint
from models import VAE, OneBit


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
    assert {"loss", "recon", "kl_z", "lr"} <= set(result.history[0])


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
        result = fit(model, guide, OneBit(5), elbo=ClosedFormELBO(num_particles=8), steps=20, seed=seed,
                     resume=resume)
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


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps must be"), ({"lr": 0.0}, "lr and lr_final"),
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
