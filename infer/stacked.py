"""StackedReplicas: one stack of replicas (infer.replicas.stack) set up as R single runs and trained together.

Each replica's setup is its single run's (infer.prepare, in the same order, so the same initial parameters and the
RNG state its first step would see, kept in a torch.Generator of its own); the stacked step is checked against every
replica's own step before training (and on the traced plan, infer.engine, at every log step), and run once with
MKL on torch's thread count to see whether it keeps serial MKL's bits (blas). train() is infer.stacked_train.
"""
import random
import time
import warnings

import numpy as np
import torch

from . import engine
from .engine import checked_outputs, traced_differs
from .prepare import adam, prepare
from .runtime import batched_blas_threads
from .stacked_train import train
from .replicas import ReplicaELBO, replica_average, replica_state, stack
from .weights import kl_weight


class StackedReplicas:
    """The stacked model and guide, their optimizer and the per-replica generators, set up as R single runs."""

    def __init__(self, models, guides, data, seeds, single, v, device, paths, extras, group=None):
        setup = time.perf_counter()
        self.group = group or len(seeds)  # the replicas of the whole group (this stack holds len(seeds) of them)
        self.models, self.guides, self.data, self.seeds, self.v = models, guides, data, seeds, v
        self.paths, self.extras, self.R = paths, extras, len(seeds)
        self.generators, self.names = [], None
        for r, seed in enumerate(seeds):  # each replica's setup as its single run's: same params, same RNG after
            s = prepare(models[r], guides[r], data, single, {**v, "seed": seed}, device)
            owner = {id(p): (role, name) for role, module in (("model", models[r]), ("guide", guides[r]))
                     if isinstance(module, torch.nn.Module) for name, p in module.named_parameters()}
            names = [(name, *owner.get(id(s.store.get_param(name).unconstrained()), (None, None)))
                     for name in s.trained]
            stray = [name for name, role, _ in names if role is None]
            if stray:
                raise ValueError(f"{type(guides[r]).__name__} cannot take a replica dimension: the param "
                                 f"{stray[0]} belongs to no nn.Module of the model or guide")
            self.names = names
            g = torch.Generator()
            g.set_state(torch.get_rng_state())
            self.generators.append(g)
        self.x, self.weights = data.x.to(device), data.w.to(device)
        with torch.random.fork_rng():
            parents = single.model_parents(models[0], (self.x,), {})
        self.model, self.guide = stack(models).to(device), stack(guides).to(device)
        self.elbo = elbo = ReplicaELBO(self.R, single.num_particles, single.noise, single.closed_form,
                                       single.free_bits)
        elbo.generators = self.generators
        elbo._parents[id(self.model)] = parents
        self.xr = elbo.expand(self.x)
        self.params = [*self.model.parameters(), *self.guide.parameters()]
        self.fused, self.optimizer = adam(self.params, v, device)
        self.beta0 = kl_weight(0, v["beta"], v["warmup"], v["warmup_start"])
        self._check(single)
        self.blas = batched_blas_threads(self._bits, torch.get_num_threads())  # same bits, both cores
        self.plan, self.engine = None, "fast"
        if v["steps"] >= engine.GRAPH_MIN_STEPS:  # read now: a patch of infer.engine.GRAPH_MIN_STEPS counts
            self.plan = self._traced()
            self.engine = "graph" if self.plan is not None else "fast"
        self.setup_seconds = time.perf_counter() - setup

    def _states(self):
        return [g.get_state() for g in self.generators]

    def _restore(self, states):
        for g, state in zip(self.generators, states):
            g.set_state(state)

    def _eager(self, beta, noise=None):
        """(names, means (T, R), losses (R,)) of one eager step of the stacked model and guide."""
        if noise is None:
            noise = getattr(self, "_noise", None) or self.elbo._new_noise()
            self._noise = noise
            noise.draw()
        terms = self.elbo._fast_terms(self.model, self.guide, self.xr, self.weights, beta, noise)
        means = self.elbo.means(terms)
        return list(terms), means, self.elbo.objective_of_means(list(terms), means)

    def _check(self, single):
        """The stacked step against each replica's own fast path on the same noise (no gradients, RNG untouched):
        ValueError in one line where a model or guide does not carry the replica dim faithfully."""
        states = self._states()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                noise = self.elbo._new_noise()
                noise.draw()
                names, means, _ = self._eager(self.beta0, noise)
                for r in range(self.R):
                    own = single._new_noise()
                    own.set(noise.noise()[r])
                    terms = single._fast_terms(self.models[r], self.guides[r], self.x, self.weights, self.beta0, own)
                    want = single.means(terms)
                    same = torch.allclose(means[:, r], want, rtol=1e-4, atol=1e-4, equal_nan=True)  # nan: diverges
                    if list(terms) != names or not same:
                        raise ValueError(f"replica {r}'s stacked loss terms {means[:, r].tolist()} differ from its "
                                         f"own {want.tolist()}")
        except Exception as err:  # noqa: BLE001  any failure means the replica dim does not go through
            raise ValueError(f"{type(self.guides[0]).__name__} with {type(self.models[0]).__name__} cannot take a "
                             f"replica dimension ({(str(err).splitlines() or [''])[0]})") from None
        finally:
            self._restore(states)

    def _bits(self):
        """[loss terms, gradients...] of one eager stacked step at the first step's beta, the generators restored
        (the same draw each call): what MKL's thread count must leave unchanged (runtime.batched_blas_threads)."""
        states = self._states()
        try:
            _, means, losses = self._eager(self.beta0)
            grads = torch.autograd.grad(losses.sum(), self.params, allow_unused=True)
            return [means.detach(), *(g for g in grads if g is not None)]
        finally:
            self._restore(states)

    def _traced(self):
        """The stacked step traced once (ClosedFormELBO.traced_step), checked against the eager stacked step
        (loss and gradients); None (the eager stacked step trains, with a warning) where it does not apply."""
        states = self._states()
        reason = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = self.elbo.traced_step(self.model, self.guide, self.xr, self.weights, self.params)
                args = plan.inputs(torch.as_tensor(self.beta0, dtype=torch.float32, device=self.x.device))
                want, want_grads, got, got_grads = checked_outputs(plan, args, self.params)
        except Exception as err:  # noqa: BLE001
            reason = f"tracing failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
        else:
            reason = traced_differs(want, want_grads, got, got_grads)
        finally:
            self._restore(states)
        if reason is not None:
            warnings.warn(f"fit_replicas: the traced plan does not apply ({reason}); training on the eager stacked "
                          "step", stacklevel=4)
            return None
        return plan

    def replica_state(self, r):
        """(params, optimizer state_dict) of replica r, laid out as its single run's (infer.replicas.replica_state)."""
        return replica_state(self._roles(), self.names, self.params, self.optimizer, r)

    def replica_average(self, r, averaged):
        """Replica r's running parameter average as its single run's (infer.replicas.replica_average)."""
        return replica_average(self._roles(), self.names, self.params, averaged, r)

    def _roles(self):
        return {"model": self.model, "guide": self.guide}

    def checkpoint(self, r, result, step, rng, window, average=None):
        from .checkpoint import save_checkpoint

        params, optimizer_state = self.replica_state(r)
        result.steps = step
        save_checkpoint(self.paths[r], result, extra=self.extras[r], rng=rng, window=window, params=params,
                        optimizer_state=optimizer_state, average=average)

    def _rng(self, r):
        """Replica r's RNG state as a single run's checkpoint holds it (its generator is its torch RNG)."""
        return {"torch": self.generators[r].get_state(), "numpy": np.random.get_state(), "python": random.getstate()}

    def train(self, callback):
        """Train the stack (infer.stacked_train.train): one FitResult, or the DivergenceError, per replica."""
        return train(self, callback)
