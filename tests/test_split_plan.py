"""The data-split plan (infer.split_plan): with two or more threads, a large step is traced once per half of the
data and the halves run on two threads. Its loss terms and gradients are the general path's; its numbers do not
depend on whether the halves ran on one thread or two; where the objective is not a sum over the data points, or
the step is small, or the fit runs on one thread, the step stays one graph."""
import importlib

import pyro
import pyro.distributions as dist
import pytest
import torch

from infer import ClosedFormELBO, fit
from infer.runtime import available_cores
from models import VAE, OneBit
from tests.test_engine import PAIRS, N, build, general_loss_and_grads, same_grads

split_plan = importlib.import_module("infer.split_plan")
engine = importlib.import_module("infer.engine")


@pytest.fixture
def any_size(monkeypatch):
    """Split steps of any size (these tests' networks are small), and trace the plan from the first step."""
    monkeypatch.setattr(split_plan, "SPLIT_MIN_ELEMENTS", 0)
    monkeypatch.setattr(engine, "GRAPH_MIN_STEPS", 0)


@pytest.mark.parametrize("name", list(PAIRS))
def test_the_split_plan_gives_the_general_paths_loss_and_gradients(name, any_size):
    model, guide = build(name)
    data, elbo = OneBit(N), ClosedFormELBO(num_particles=16, noise="lattice")
    params = [*model.parameters(), *guide.parameters()]
    with pyro.validation_enabled(False):
        plan = elbo.traced_step(model, guide, data.x, data.w, params, split=True)
        pyro.set_rng_seed(2)
        terms, loss, grads = general_loss_and_grads(elbo, model, guide, data, 0.5, params)
        pyro.set_rng_seed(2)
        names, means, split_loss = plan(0.5)
    # the mixture guide draws its components inside the step: TorchScript would freeze them, so it stays one graph
    assert (plan.halves is None) == (name == "mixture")
    assert names == list(terms) and torch.allclose(split_loss, loss, rtol=1e-6)
    assert torch.allclose(means, torch.stack([t.mean() for t in terms.values()]), rtol=1e-6, atol=1e-7)
    same_grads(grads, [p.grad for p in params], exact=False)


def train(name, threads, steps=40, **kw):
    model, guide = build(name)
    return fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=16, noise="lattice"), steps=steps,
               log_every=10, seed=0, threads=threads, **kw)


@pytest.mark.skipif(available_cores() < 2, reason="needs two cores")
def test_halves_on_two_threads_train_to_the_numbers_of_the_halves_on_one_bit_for_bit(any_size, monkeypatch):
    forked = train("dlgm", threads=2)
    monkeypatch.setattr(split_plan.Halves, "agrees", lambda self, args: False)  # as if the bits had differed
    serial = train("dlgm", threads=2)
    assert forked.engine == "graph, data split in halves on 2 threads"
    assert serial.engine == "graph, data split in halves"
    assert forked.history == serial.history


def test_the_split_run_trains_to_the_whole_graphs_numbers_within_rounding(any_size):
    split, whole = train("dlgm", threads=2), train("dlgm", threads=1)
    assert split.engine.startswith("graph, data split in halves") and whole.engine == "graph"
    assert [r["loss"] for r in split.history] == pytest.approx([r["loss"] for r in whole.history], rel=1e-5)


def test_one_thread_keeps_the_step_one_graph_and_its_numbers(any_size):
    assert train("dlgm", threads=1).engine == "graph"


def test_a_split_run_restores_the_thread_count(any_size):
    before = torch.get_num_threads()
    train("dlgm", threads=2, steps=10)
    assert torch.get_num_threads() == before


def test_a_small_step_stays_one_graph(monkeypatch):
    monkeypatch.setattr(engine, "GRAPH_MIN_STEPS", 0)
    assert train("dlgm", threads=2).engine == "graph"  # 16 particles x 2 x 20 bits, below SPLIT_MIN_ELEMENTS


def test_free_bits_keep_the_step_one_graph(any_size):
    model, guide = build("vae")
    elbo = ClosedFormELBO(num_particles=16, noise="lattice", free_bits=0.1)
    assert not split_plan.splits(elbo, model, guide, OneBit(N).x, OneBit(N).w)


def global_scale_model(x):
    """A VAE with a global latent log-scale outside the data plate: its KL would be counted by both halves."""
    g = pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=(z * g.exp()).expand_as(x)).to_event(1), obs=x)


def global_scale_guide(x):
    g_loc = pyro.param("g_loc", torch.tensor(0.0))
    pyro.sample("g", dist.Normal(g_loc, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))


def test_a_latent_outside_the_data_plate_keeps_the_step_one_graph(any_size):
    data, elbo = OneBit(N), ClosedFormELBO(num_particles=16, noise="lattice")
    assert not split_plan.splits(elbo, global_scale_model, global_scale_guide, data.x, data.w)


def test_a_guide_that_fixes_its_plate_size_keeps_the_step_one_graph_and_trains(any_size):
    model = VAE(N, hidden=16)

    def guide(x):  # two data points written into the guide: it cannot run on half of them
        m = pyro.param("m", torch.tensor([[-1.0], [1.0]]))
        s = pyro.param("s", torch.ones(2, 1), constraint=dist.constraints.positive)
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(m, s).to_event(1))

    result = fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=16, noise="lattice"), steps=100,
                 lr=2e-2, lr_final=1e-3, log_every=50, seed=0, threads=2)
    assert result.engine == "graph"
    assert result.history[-1]["loss"] < result.history[0]["loss"]
