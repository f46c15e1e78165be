"""The training engine: the fast path (one light handler per run) and the traced plan (the fast path's forward
traced once into a graph of tensor ops) give the general path's loss and gradients (golden values), for the built-in
models and guides and for a guide a user writes; where they cannot apply, the general path runs and says so."""
import copy
import importlib

import pyro
import pyro.distributions as dist
import pytest
import torch

from guides import FlowGuide, GaussianGuide, MixtureGuide, StructuredGuide
from infer import ClosedFormELBO, fit, weighted
from infer.weights import LatentScale
from models import DLGM, VAE, OneBit

N = 20
PAIRS = {"vae": lambda: (VAE(N, hidden=16, gain=True), GaussianGuide),
         "dlgm": lambda: (DLGM(N, hidden=16, prior_hidden=16, prior_gain=True), StructuredGuide),
         "flow": lambda: (VAE(N, hidden=16), FlowGuide),
         "mixture": lambda: (DLGM(N, hidden=16, prior_hidden=16), MixtureGuide)}


def build(name):
    pyro.set_rng_seed(0)
    model, make = PAIRS[name]()
    return model, make(model)


def general_loss_and_grads(elbo, model, guide, data, beta, params):
    terms = elbo.particle_terms(LatentScale(beta)(weighted(model, data)), LatentScale(beta)(weighted(guide, data)),
                                data.x)
    loss = elbo.objective(terms)
    return terms, loss, torch.autograd.grad(loss, params, allow_unused=True)


def same_grads(a, b, exact):
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(x.abs().max()))


@pytest.mark.parametrize("noise", ["lattice", "qmc", "mc"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_the_fast_path_gives_the_general_paths_loss_and_gradients_to_the_bit(name, noise):
    model, guide = build(name)
    data, elbo = OneBit(N), ClosedFormELBO(num_particles=16, noise=noise)
    params = [*model.parameters(), *guide.parameters()]
    pyro.set_rng_seed(1)
    terms, loss, grads = general_loss_and_grads(elbo, model, guide, data, 0.7, params)
    pyro.set_rng_seed(1)
    fast = elbo.fast_terms(model, guide, data.x, data.w, 0.7)
    fast_loss = elbo.objective(fast)
    assert list(fast) == list(terms) and torch.equal(fast_loss, loss)
    same_grads(grads, torch.autograd.grad(fast_loss, params, allow_unused=True), exact=True)


def traced_and_general(name, joint):
    """(params, the general path's (terms, loss, grads), the plan's (names, means, loss)) on the same draw, beta 0.5;
    joint: the plan is traced with the params (it sets their gradients)."""
    model, guide = build(name)
    data, elbo = OneBit(N), ClosedFormELBO(num_particles=16, noise="lattice")
    params = [*model.parameters(), *guide.parameters()]
    with pyro.validation_enabled(False):
        plan = elbo.traced_step(model, guide, data.x, data.w, params if joint else None)
        pyro.set_rng_seed(2)
        general = general_loss_and_grads(elbo, model, guide, data, 0.5, params)
        pyro.set_rng_seed(2)
        return params, general, plan(0.5)


@pytest.mark.parametrize("name", list(PAIRS))
def test_the_traced_plan_gives_the_general_paths_loss_and_gradients(name):
    params, (terms, loss, grads), (names, means, traced_loss) = traced_and_general(name, joint=False)
    assert names == list(terms)
    assert torch.allclose(means, torch.stack([t.mean() for t in terms.values()]), rtol=1e-6)
    assert torch.allclose(traced_loss, loss, rtol=1e-6)
    same_grads(grads, torch.autograd.grad(traced_loss, params, allow_unused=True), exact=False)


@pytest.mark.parametrize("name", list(PAIRS))
def test_the_joint_plan_sets_the_general_paths_gradients_itself(name):
    params, (terms, loss, grads), (names, means, traced_loss) = traced_and_general(name, joint=True)
    assert names == list(terms) and not traced_loss.requires_grad
    assert torch.allclose(traced_loss, loss, rtol=1e-6)
    same_grads(grads, [p.grad for p in params], exact=False)
    assert all(p.grad is None or p.grad.stride() == p.stride() for p in params)


def test_the_joint_plan_trains_a_dlgm_to_the_eager_fast_paths_numbers_to_the_bit(monkeypatch):
    runs = {}
    for graph_from in (0, 10**9):  # the joint graph from the first step; never (the eager fast path)
        monkeypatch.setattr(importlib.import_module("infer.engine"), "GRAPH_MIN_STEPS", graph_from)
        model, guide = build("dlgm")
        runs[graph_from] = fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=8, noise="lattice"),
                               steps=40, log_every=10, seed=0)
    assert runs[0].engine == "graph" and runs[10**9].engine == "fast"
    assert runs[0].history == runs[10**9].history


@pytest.mark.parametrize("name", list(PAIRS))
def test_fit_on_the_traced_plan_gives_the_general_paths_history(name, monkeypatch):
    monkeypatch.setattr(importlib.import_module("infer.engine"), "GRAPH_MIN_STEPS", 0)
    runs = {}
    for engine in ("auto", "general"):
        model, guide = build(name)
        result = fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=8, noise="lattice"), steps=40,
                     log_every=20, seed=0, warmup=10, engine=engine)
        runs[engine] = result
    assert runs["auto"].engine == "graph" and runs["general"].engine == "general"
    assert [r["loss"] for r in runs["auto"].history] == pytest.approx([r["loss"] for r in runs["general"].history],
                                                                      rel=1e-5)


def test_a_short_run_uses_the_eager_fast_path_with_the_general_paths_numbers_to_the_bit():
    runs = {}
    for engine in ("auto", "general"):
        model, guide = build("dlgm")
        runs[engine] = fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=8, noise="lattice"), steps=30,
                           log_every=10, seed=0, engine=engine)
    assert runs["auto"].engine == "fast" and runs["auto"].history == runs["general"].history


def test_a_guide_written_by_a_user_trains_through_the_fast_path(monkeypatch):
    monkeypatch.setattr(importlib.import_module("infer.engine"), "GRAPH_MIN_STEPS", 0)
    model = VAE(N, hidden=16)

    def guide(x):  # q(z|x_k) = N(m_k, s_k^2), one free Gaussian per data point
        m = pyro.param("m", torch.tensor([[-1.0], [1.0]]))
        s = pyro.param("s", torch.ones(2, 1), constraint=dist.constraints.positive)
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(m, s).to_event(1))

    result = fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=16, noise="lattice"), steps=300,
                 lr=2e-2, lr_final=1e-3, log_every=100, seed=0)
    assert result.engine == "graph"
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 1.0
    assert pyro.param("m")[1, 0] - pyro.param("m")[0, 0] > 1.0


def test_a_guide_with_value_dependent_control_flow_is_caught_by_the_log_step_check(monkeypatch):
    monkeypatch.setattr(importlib.import_module("infer.engine"), "GRAPH_MIN_STEPS", 0)
    model = VAE(N, hidden=16)
    calls = {"n": 0}

    def guide(x):  # its branch changes after the trace: the traced plan would keep the first one
        calls["n"] += 1
        m = pyro.param("m", torch.tensor([[-1.0], [1.0]]))
        shift = 0.0 if calls["n"] < 8 else 5.0
        with pyro.plate("data", 2):
            pyro.sample("z", dist.Normal(m + shift, 1.0).to_event(1))

    with pytest.raises(RuntimeError, match="traced plan's loss terms differ from the eager ones"):
        fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=8, noise="lattice"), steps=40, log_every=20,
            seed=0)


def test_without_vectorised_particles_the_general_path_runs_and_says_so():
    model, guide = build("vae")
    with pytest.warns(UserWarning, match="fast path does not apply"):
        result = fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=1), steps=3, log_every=3)
    assert result.engine == "general"


def test_resuming_on_the_traced_plan_gives_the_uninterrupted_history(tmp_path, monkeypatch):
    from infer.checkpoint import load_checkpoint

    monkeypatch.setattr(importlib.import_module("infer.engine"), "GRAPH_MIN_STEPS", 0)

    def run(**kwargs):
        model, guide = build("dlgm")
        return fit(model, guide, OneBit(N), elbo=ClosedFormELBO(num_particles=8, noise="lattice"), steps=90,
                   log_every=20, seed=0, **kwargs)

    full = run()

    def crash(step, row):
        if step >= 60:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(callback=crash, checkpoint_path=tmp_path / "c.pt", checkpoint_every=25)
    resumed = run(resume=load_checkpoint(tmp_path / "c.pt"))
    assert full.engine == resumed.engine == "graph" and resumed.history == full.history


def _lean_and_torch_adam(*shapes, seed=0, betas=(0.9, 0.99)):
    """(ours, theirs, LeanAdam over ours, torch's fused Adam over theirs): two copies of the same random params."""
    from infer.adam import LeanAdam

    torch.manual_seed(seed)
    ours = [torch.randn(*shape, requires_grad=True) for shape in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    return (ours, theirs, LeanAdam(ours, lr=1e-2, betas=betas),
            torch.optim.Adam(theirs, lr=1e-2, betas=betas, fused=True))


def test_lean_adam_steps_exactly_as_torchs_fused_adam_including_a_skipped_step():
    ours, theirs, lean, torch_adam = _lean_and_torch_adam((5, 3), (7,))
    for i in range(30):
        for optimizer, params in ((lean, ours), (torch_adam, theirs)):
            optimizer.zero_grad()
            ((params[0] ** 2).sum() + params[1].sin().sum()).backward()
            optimizer.param_groups[0]["lr"] = 1e-2 * 0.97 ** i
            optimizer.found_inf, optimizer.grad_scale = torch.tensor(float(i == 12)), None
            optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert float(lean.state[ours[0]]["step"]) == 29.0


def test_lean_adams_unwrapped_update_counts_each_param_as_torch_does_when_a_grad_is_missing():
    ours, theirs, lean, torch_adam = _lean_and_torch_adam((5, 3), (7,))
    for i in range(12):
        for optimizer, params in ((lean, ours), (torch_adam, theirs)):
            optimizer.zero_grad(set_to_none=True)
            loss = (params[0] ** 2).sum() + (params[1].sin().sum() if i not in (4, 5) else 0.0)
            loss.backward()  # steps 4 and 5: the second param has no grad, so torch leaves it (and its count)
            optimizer.update() if optimizer is lean else optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert [float(lean.state[p]["step"]) for p in ours] == [12.0, 10.0]


def test_lean_adam_resumes_from_its_state_dict_as_torchs_fused_adam_does():
    from infer.adam import LeanAdam

    ours, theirs, first, torch_adam = _lean_and_torch_adam((4,), (2, 3), seed=1, betas=(0.9, 0.999))

    def steps(optimizer, params, k):
        for _ in range(k):
            optimizer.zero_grad(set_to_none=True)
            (params[0].exp().sum() + (params[1] ** 3).sum()).backward()
            optimizer.step()

    steps(first, ours, 7)
    saved = copy.deepcopy(first.state_dict())
    again = LeanAdam(ours, lr=1e-2, betas=(0.9, 0.999))
    again.load_state_dict(saved)
    steps(again, ours, 6)
    steps(torch_adam, theirs, 13)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert [float(again.state[p]["step"]) for p in ours] == [13.0, 13.0]


def test_moving_a_negation_after_its_sum_leaves_the_traced_graph_bit_for_bit_equal():
    from torch.fx.experimental.proxy_tensor import make_fx

    from infer.plan import negate_after_sums

    x = torch.randn(4, 2, 50)

    def f(x):
        return (-torch.nn.functional.softplus(x)).view(4, 2, -1).sum(-1) * 3.0

    graph = make_fx(f)(x)
    negate_after_sums(graph.graph)
    graph.recompile()
    negations = [n for n in graph.graph.nodes if n.target == torch.ops.aten.neg.default]
    assert len(negations) == 1 and negations[0].args[0].target == torch.ops.aten.sum.dim_IntList
    assert torch.equal(graph(x), f(x))
