"""Which path computes fit's loss: the traced plan, the eager fast path or Pyro's general trace and replay, each
faster one used only where it is checked to give the slower one's numbers (loss terms and gradients)."""
import warnings

import pyro
import torch

from .elbo import ClosedFormELBO


GRAPH_MIN_STEPS = 200  # the traced plan costs a second or two to trace: worth it from this many steps on


def _engine(elbo, model, guide, model_w, guide_w, x, weights, beta, params, steps_left):
    """('graph', plan) | ('fast', None) | ('general', None): the fastest path that gives the general path's
    numbers here. The eager fast path (ClosedFormELBO.fast_terms) is checked against particle_terms once; for runs
    of GRAPH_MIN_STEPS steps or more, the traced plan (ClosedFormELBO.traced_step) is checked against the eager fast
    path, loss and gradients, on the same noise. Every check runs on a forked RNG: the caller's is untouched."""
    if not _fast_path_applies(elbo, model, guide, model_w, guide_w, x, weights, beta):
        return "general", None
    if steps_left < GRAPH_MIN_STEPS:
        return "fast", None
    reason = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = elbo.traced_step(model, guide, x, weights, params)
            beta_t = torch.as_tensor(beta, dtype=torch.float32, device=x.device)
            with torch.random.fork_rng():
                args = plan.inputs(beta_t)
                want, want_grads, got, got_grads = checked_outputs(plan, args, params)
    except Exception as err:  # noqa: BLE001  any failure keeps the eager fast path
        reason = f"tracing failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
    else:
        reason = traced_differs(want, want_grads, got, got_grads)
    if reason is not None:
        warnings.warn(f"fit: the traced plan does not apply to this model and guide ({reason}); training on the "
                      "eager fast path", stacklevel=5)
        return "fast", None
    return "graph", plan


def checked_outputs(plan, args, params):
    """((means, loss) of the eager forward, its gradients; (means, loss) of the graph, its gradients) on the same
    inputs and RNG state (forked: the caller's is untouched), each gradient list aligned to `params` (None where the
    loss does not reach a param): what infer.fit compares before it trains on the plan."""
    with torch.random.fork_rng():
        state = torch.get_rng_state()
        want = plan.forward(*args)
        want_grads = torch.autograd.grad(want[1].sum(), params, allow_unused=True)
        torch.set_rng_state(state)
        if plan.targets is None:
            got = plan.graph(*args)
            return want, want_grads, got[:2], torch.autograd.grad(got[1].sum(), params, allow_unused=True)
        with torch.no_grad():
            means, loss, *grads = plan.graph(*args)
    by_param = {id(p): g for p, g in zip(plan.targets, grads)}
    return want, want_grads, (means, loss), [by_param.get(id(p)) for p in params]


def traced_differs(want, want_grads, got, got_grads):
    """Why the traced plan's loss terms or gradients differ from the eager ones (checked_outputs' four lists), or
    None where they agree (terms to rtol 1e-5, gradients to rtol 1e-4 of the largest)."""
    if not torch.allclose(want[0], got[0], rtol=1e-5, atol=1e-6):
        return "the traced loss terms differ from the eager ones"
    for a, b in zip(want_grads, got_grads):
        if (a is None) != (b is None) or a is not None and not torch.allclose(
                a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(a.abs().max()))):
            return ("the traced gradients differ from the eager ones (e.g. torch.no_grad or a custom autograd "
                    "function in the model or guide)")
    return None


def check_plan(plan, step):
    """Re-run the traced plan's last step eagerly (same noise, same RNG state, no gradients) and raise
    RuntimeError if its loss terms differ: value-dependent Python control flow left the traced branch."""
    with torch.random.fork_rng(), torch.no_grad():
        if plan.last_rng is not None:
            torch.set_rng_state(plan.last_rng)
        eager = plan.forward(*plan.last_args)[0]
    if not torch.allclose(eager, plan.last_means.detach(), rtol=1e-5, atol=1e-6, equal_nan=True):
        raise RuntimeError(f"the traced plan's loss terms differ from the eager ones at step {step} (a model or "
                           "guide whose Python control flow depends on values); rerun fit with engine='general'")


def _fast_path_applies(elbo, model, guide, model_w, guide_w, x, weights, beta) -> bool:
    """Whether ClosedFormELBO.fast_terms gives particle_terms' values here: both are run once on the same RNG state
    (forked: the caller's is untouched) and compared. Where not, fit trains on the general path and says so once."""
    reason = None
    if not (elbo.vectorize_particles and elbo.num_particles > 1):
        reason = "it needs vectorised particles with num_particles > 1"
    else:
        with torch.random.fork_rng(), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
            state = torch.get_rng_state()
            general = elbo.particle_terms(model_w, guide_w, x)
            torch.set_rng_state(state)
            try:
                fast = elbo.fast_terms(model, guide, x, weights, beta)
            except Exception as err:  # noqa: BLE001  any failure sends training down the general path
                reason = f"it failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
            else:
                if not all(bool(torch.isfinite(t).all()) for t in general.values()):
                    reason = ("the general path's loss terms are not finite at these parameters, so the two cannot "
                              "be compared")
                elif list(fast) != list(general) or not all(
                        torch.allclose(fast[k], general[k], rtol=1e-6, atol=1e-6, equal_nan=True) for k in general):
                    reason = "its loss terms differ from the general path's"
    if reason is not None:
        warnings.warn(f"fit: the fast path does not apply to this model and guide ({reason}); training on the "
                      "general path (Pyro's trace and replay)", stacklevel=5)
    return reason is None


def final_check(compute, start, steps):
    """One more evaluation of the objective at the final parameters (no gradients, the RNG untouched): an update
    that made the parameters produce a non-finite loss is caught here, not in evaluation."""
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        try:
            loss, vec = compute(steps - 1 if steps > start else start)
        except (ValueError, RuntimeError):  # a model or guide that refuses non-finite inputs itself
            return False
    return bool(torch.isfinite(vec).all()) and bool(torch.isfinite(loss).all())


def _reporter(model, guide, x, log_every):
    """For ELBOs without per-term output: a closure giving the loss terms (one 64-particle closed-form estimate,
    recomputed once per logging window) to log beside Pyro's own gradient steps."""
    probe, cache = ClosedFormELBO(num_particles=64), {}

    def terms_of(step):
        window = step // log_every
        if cache.get("window") != window:
            with torch.no_grad():
                cache.update(window=window, terms=probe.particle_terms(model, guide, x))
        return cache["terms"]

    return terms_of


def loss_closure(elbo, model, guide, data, x, scale, model_w, guide_w, params, needs_guide, log_every, steps_left,
                 device, engine="auto"):
    """(compute, term_names, path, plan): compute(step) gives (loss, vec), the loss to minimise and a detached
    vector of the step's loss terms (named by term_names, filled in at the first call) then the objective; path is
    the one that computes it (graph, fast or general; engine="general" forces general), plan the traced plan or
    None. Without a guide the loss is elbo.marginal_terms' nll; a ClosedFormELBO takes the fastest checked path
    (_engine); any other Pyro ELBO runs its own loss_and_grads (compute.backward_done: the gradients are in place)
    and logs _reporter's terms."""
    weights = data.w.to(device)
    if not needs_guide:
        def compute(step):
            terms = elbo.marginal_terms(model, data)
            loss = terms["nll"].mean()
            return loss, torch.stack([loss, loss]).detach()
        return compute, ["nll"], "general", None
    if isinstance(elbo, ClosedFormELBO):  # one pass gives the loss and its terms
        term_names = []
        level, plan = "general", None
        if engine == "auto":
            level, plan = _engine(elbo, model, guide, model_w, guide_w, x, weights, scale.beta, params, steps_left)

        def compute(step):
            if plan is not None:
                keys, means, loss = plan(scale.beta)
            else:
                if level == "fast":
                    terms = elbo.fast_terms(model, guide, x, weights, scale.beta)
                else:
                    terms = elbo.particle_terms(model_w, guide_w, x)
                keys = list(terms)
                means = torch.stack([t.mean() for t in terms.values()])
                loss = elbo.objective_of_means(keys, means)
            if not term_names:
                term_names.extend(keys)
            elif keys != term_names:
                raise RuntimeError(f"the loss terms changed from {term_names} to {keys} during training")
            return loss, torch.cat([means, loss.reshape(1)]).detach()
        compute.backward_done = plan is not None  # the joint graph sets the gradients itself
        return compute, term_names, level, plan
    # any other Pyro ELBO (Trace_ELBO, TraceMeanField_ELBO, RenyiELBO, ...) trains as Pyro defines it
    terms_of = _reporter(model_w, guide_w, x, log_every)
    term_names = []

    def compute(step):
        if torch.is_grad_enabled():
            loss = torch.as_tensor(elbo.loss_and_grads(model_w, guide_w, x), device=x.device)
        else:
            loss = torch.as_tensor(elbo.loss(model_w, guide_w, x), device=x.device)
        terms = terms_of(step)
        if not term_names:
            term_names.extend(terms)
        means = torch.stack([t.mean() for t in terms.values()])
        return loss, torch.cat([means, loss.reshape(1).to(means)]).detach()
    compute.backward_done = True
    return compute, term_names, "general", None


__all__ = ["GRAPH_MIN_STEPS", "loss_closure", "check_plan", "checked_outputs", "final_check", "traced_differs"]
