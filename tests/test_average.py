"""Parameter averaging (infer.average, fit(average=...)) and the floored log-gain (models.nets.LogGain(floor=...)).

A run with average = f ends with the mean of its iterates over its last ceil(f * steps) steps, resumes inside that
window as if uninterrupted, and a replica averages as its single run does. A floored gain never acts below its
floor in the forward, and its parameter keeps the unfloored gradient (straight-through)."""
import numpy as np
import pytest
import torch

from guides import GaussianGuide
from infer import ClosedFormELBO, fit
from infer.average import average_start
from infer.checkpoint import load_checkpoint
from infer.fit_replicas import fit_replicas
from models import DLGM, VAE, OneBit
from models.nets import LogGain

ELBO = dict(elbo=ClosedFormELBO(num_particles=8, noise="lattice"))


def vae():
    model = VAE(5, hidden=8, gain=True)
    return model, GaussianGuide(model, hidden=8)


def flat(model, guide):
    return torch.cat([p.detach().reshape(-1) for m in (model, guide) for p in m.parameters()])


def test_the_averaging_window_is_the_last_ceil_fraction_of_the_steps():
    assert average_start(14000, 0.1) == 12600
    assert average_start(10, 0.25) == 7
    assert average_start(10, 0.0) == 10


def test_the_final_parameters_are_the_mean_of_the_iterates_over_the_last_fraction_of_the_steps():
    iterates = []
    model, guide = vae()
    fit(model, guide, OneBit(5), seed=3, steps=12, log_every=1, average=0.0,
        callback=lambda step, row: iterates.append(flat(model, guide)), **ELBO)
    last = flat(model, guide)
    averaged_model, averaged_guide = vae()
    fit(averaged_model, averaged_guide, OneBit(5), seed=3, steps=12, log_every=1, average=0.25, **ELBO)
    want = torch.stack(iterates[-3:]).mean(0)
    torch.testing.assert_close(flat(averaged_model, averaged_guide), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, last)


def test_averaging_leaves_the_trajectory_and_its_history_unchanged():
    runs = []
    for average in (0.0, 0.5):
        model, guide = vae()
        runs.append(fit(model, guide, OneBit(5), seed=1, steps=20, log_every=5, average=average, **ELBO))
    assert [r["loss"] for r in runs[0].history] == [r["loss"] for r in runs[1].history]
    assert runs[1].recipe["average"] == 0.5


def test_a_run_resumed_inside_the_averaging_window_ends_as_the_uninterrupted_run(tmp_path):
    path, copy = tmp_path / "checkpoint.pt", tmp_path / "at15.pt"

    def keep_the_step_15_checkpoint(step, row):  # the final checkpoint replaces it after the last log
        if step == 20:
            copy.write_bytes(path.read_bytes())

    model, guide = vae()
    fit(model, guide, OneBit(5), seed=2, steps=20, log_every=5, average=0.5, checkpoint_path=path,
        checkpoint_every=5, callback=keep_the_step_15_checkpoint, **ELBO)
    state = load_checkpoint(copy)
    assert state["step"] == 15 and state["average"]["count"] == 5
    resumed_model, resumed_guide = vae()
    fit(resumed_model, resumed_guide, OneBit(5), seed=2, steps=20, log_every=5, average=0.5, resume=state, **ELBO)
    torch.testing.assert_close(flat(resumed_model, resumed_guide), flat(model, guide), rtol=1e-6, atol=1e-7)


def test_a_replicas_averaged_parameters_are_its_single_runs():
    pairs = [vae() for _ in range(2)]
    fit_replicas([p[0] for p in pairs], [p[1] for p in pairs], OneBit(5), [4, 5], steps=20, log_every=5,
                 average=0.5, **ELBO)
    model, guide = vae()
    fit(model, guide, OneBit(5), seed=5, steps=20, log_every=5, average=0.5, **ELBO)
    torch.testing.assert_close(flat(*pairs[1]), flat(model, guide), rtol=1e-4, atol=1e-5)


def test_a_replicas_checkpoint_inside_the_window_holds_its_single_runs_average(tmp_path):
    paths = [tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "single.pt"]
    copies = [tmp_path / "b15.pt", tmp_path / "single15.pt"]

    def keep(source, copy):  # the final checkpoint replaces the step-15 one after the last log
        return lambda step, row: copy.write_bytes(source.read_bytes()) if step == 20 else None

    pairs = [vae() for _ in range(2)]
    keep_replica = keep(paths[1], copies[0])
    fit_replicas([p[0] for p in pairs], [p[1] for p in pairs], OneBit(5), [4, 5], steps=20, log_every=5,
                 average=0.5, checkpoint_paths=paths[:2], checkpoint_every=15,
                 callback=lambda r, step, row: keep_replica(step, row) if r == 1 else None, **ELBO)
    fit(*vae(), OneBit(5), seed=5, steps=20, log_every=5, average=0.5, checkpoint_path=paths[2], checkpoint_every=15,
        callback=keep(paths[2], copies[1]), **ELBO)
    ours, theirs = (load_checkpoint(c)["average"] for c in copies)
    assert (ours["start"], ours["count"]) == (theirs["start"], theirs["count"]) == (10, 5)
    assert [m.shape for m in ours["means"]] == [m.shape for m in theirs["means"]]
    for a, b in zip(ours["means"], theirs["means"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("average", [-0.1, 1.0, float("nan"), "0.1"])
def test_an_average_outside_0_to_1_is_refused_in_one_line(average):
    with pytest.raises(ValueError, match=r"^average=.* is not allowed: average must be a number in \[0, 1\)") as err:
        fit(*vae(), OneBit(5), steps=5, average=average)
    assert "\n" not in str(err.value)


def test_a_floored_gain_never_acts_below_its_floor_and_keeps_its_gradient():
    gain = LogGain(1, rate=2.0, floor=0.0)
    with torch.no_grad():
        gain.log_gain.fill_(-1.0)  # rate * g = -2, below the floor
    h = torch.tensor([[3.0]])
    out = gain(h)
    assert float(out.detach()) == 3.0  # gain exp(max(-2, 0)) = 1
    out.sum().backward()
    assert float(gain.log_gain.grad) == pytest.approx(2.0 * 3.0)  # d/dg of h * exp(rate * g) at the floor: rate * h
    with torch.no_grad():
        gain.log_gain.fill_(0.5)  # above the floor it is the plain gain
    assert float(gain(h).detach()) == pytest.approx(3.0 * np.exp(1.0))


def test_an_unfloored_gain_goes_below_one():
    gain = LogGain(1, rate=1.0)
    with torch.no_grad():
        gain.log_gain.fill_(-1.0)
    assert float(gain(torch.ones(1, 1)).detach()) == pytest.approx(np.exp(-1.0))


def test_a_stack_of_floored_gains_acts_and_differentiates_as_each_gain_alone():
    from infer.replicas import ReplicaLogGain

    gains = [LogGain(1, rate=2.0, floor=0.0) for _ in range(2)]
    with torch.no_grad():
        gains[0].log_gain.fill_(-1.0)  # floored
        gains[1].log_gain.fill_(0.5)   # above the floor
    stacked = ReplicaLogGain(gains)
    h = torch.tensor([[[3.0]], [[3.0]]])  # (R, batch, dim)
    out = stacked(h)
    out.sum().backward()
    for r, gain in enumerate(gains):
        mine = gain(h[r])
        mine.sum().backward()
        torch.testing.assert_close(out[r], mine)
        torch.testing.assert_close(stacked.log_gain.grad[r], gain.log_gain.grad)


def test_a_gain_floor_that_is_not_a_finite_number_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^prior_gain_floor=inf is not allowed"):
        DLGM(5, prior_gain=True, prior_gain_floor=float("inf"))
