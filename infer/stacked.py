"""StackedReplicas: one stack of replicas (infer.replicas.stack) set up as R single runs and trained together.

Each replica's setup is its single run's (infer.prepare, in the same order, so the same initial parameters and the
RNG state its first step would see, kept in a torch.Generator of its own); the stacked step is checked against every
replica's own step before training (and on the traced plan, infer.engine, at every log step). train() runs the
steps, logs, checkpoints and the divergence guard per replica, as infer.fit does for one run: a replica that
diverges is reported as its single run would be (its DivergenceError holds its history up to the last good log) and
the others go on.
"""
import random
import time
import warnings

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from .average import ParameterAverage, average_start
from . import engine
from .engine import check_plan
from .plan import checked_outputs
from .prepare import adam, prepare
from .recipe import learning_rate
from .runtime import batched_blas_threads, blas_threads
from .result import FitResult, divergence, last_update, Window
from .replicas import ReplicaELBO, replica_average, replica_state, stack, unstack
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
                grads = [want_grads, got_grads]
        except Exception as err:  # noqa: BLE001
            reason = f"tracing failed ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
        else:
            if not torch.allclose(want[0], got[0], rtol=1e-5, atol=1e-6) or any(
                    (a is None) != (b is None) or a is not None and not torch.allclose(
                        a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(a.abs().max()))) for a, b in zip(*grads)):
                reason = "the traced loss or gradients differ from the eager ones"
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
        v, R = self.v, self.R
        steps, log_every, every = v["steps"], v["log_every"], v["checkpoint_every"]
        label = f"{self.engine}, {R} replicas stacked" + (f", matmuls on {self.blas} threads" if self.blas > 1 else "")
        results = [FitResult(optimizer=self.optimizer, buffers={}, engine=label,
                             setup_seconds=self.setup_seconds,
                             recipe={**{k: v[k] for k in ("steps", "lr", "lr_final", "schedule", "beta", "warmup",
                                                          "warmup_start", "average")},
                                     "seed": seed, "replicas": self.group, "adam_betas": tuple(v["adam_betas"]),
                                     "num_particles": self.elbo.num_particles, "noise": self.elbo.noise,
                                     "objective": "ClosedFormELBO"}) for seed in self.seeds]
        errors = [None] * R
        found = torch.zeros(R, dtype=torch.bool, device=self.x.device)  # sticky: from a replica's first bad step on
        bad = torch.zeros(R, device=self.x.device)  # how many steps since (and with) its first non-finite one
        values, betas, names = [], [], None
        averaged = ParameterAverage(self.params, average_start(steps, v["average"]))  # elementwise: per replica
        t0 = time.perf_counter()

        def window_of(r):
            if not values:
                return None
            return {"values": torch.stack([vec[:, r] for vec in values]).cpu(), "betas": list(betas)}

        bar = tqdm(range(steps), disable=not v["progress"], desc=f"fit x{R}", dynamic_ncols=True, mininterval=0.5)
        optimizer_step = self.optimizer.update if self.fused else self.optimizer.step  # as in infer.fit
        with pyro.validation_enabled(False), warnings.catch_warnings(), blas_threads(self.blas):
            warnings.filterwarnings("ignore", message="Failed to verify mean field restriction")
            for step in bar:
                pending = None
                if self.paths and every and step % every == 0 and step > 0:
                    pending = [(self._rng(r), window_of(r), self.replica_average(r, averaged)) for r in range(R)]
                rate = learning_rate(step, steps, v["lr"], v["lr_final"], v["schedule"])
                beta = kl_weight(step, v["beta"], v["warmup"], v["warmup_start"])
                for group in self.optimizer.param_groups:
                    group["lr"] = rate
                self.optimizer.zero_grad(set_to_none=True)
                if self.plan is not None:  # the joint graph sets the gradients of the summed objectives
                    names, means, losses = self.plan(beta)
                else:
                    names, means, losses = self._eager(beta)
                    losses.sum().backward()
                vec = torch.cat([means, losses.unsqueeze(0)]).detach()  # (T + 1, R)
                found |= ~torch.isfinite(vec).all(0)
                bad.add_(found)
                if step == 0:
                    for r in range(R):
                        results[r].initial_loss = float(vec[-1, r])
                if pending is not None:
                    counts = bad.tolist()
                    for r in range(R):
                        if errors[r] is None and counts[r] == 0:
                            self.checkpoint(r, results[r], step, *pending[r])
                if self.plan is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
                    check_plan(self.plan, step + 1)  # fit's check: the plan against its eager forward
                optimizer_step()
                averaged.update(step + 1)
                values.append(vec)
                betas.append(beta)
                if (step + 1) % log_every == 0 or step + 1 == steps:
                    counts = bad.tolist()
                    stacked = torch.stack(values)  # (k, T + 1, R)
                    for r in range(R):
                        if errors[r] is not None:
                            continue
                        if counts[r] > 0:
                            first = step + 1 - int(counts[r]) + 1  # replica r's first non-finite step
                            errors[r] = divergence(first, first == 1, 0, v, results[r], True)
                            continue
                        window = Window()
                        window.values, window.betas = list(stacked[..., r].unbind(0)), list(betas)
                        row = window.row(step + 1, rate, names, True)
                        results[r].history.append(row)
                        if callback is not None:
                            callback(r, step + 1, row)
                    values, betas = [], []
                    if all(e is not None for e in errors):
                        break
        wall = time.perf_counter() - t0 + self.setup_seconds
        averaged.apply()
        self._final_check(errors, results, steps)
        unstack(self.model, self.models)
        unstack(self.guide, self.guides)
        out = []
        for r in range(R):
            results[r].steps, results[r].wall_seconds = steps, wall
            results[r].window = window_of(r)
            if errors[r] is None and self.paths:
                self.checkpoint(r, results[r], steps, self._rng(r), results[r].window)
            out.append(errors[r] if errors[r] is not None else results[r])
        return out

    def _final_check(self, errors, results, steps):
        """One more evaluation at the final parameters (no gradients, generators untouched): a replica whose last
        update made its loss non-finite is diverged."""
        states = self._states()
        try:
            with torch.no_grad(), pyro.validation_enabled(False):
                _, means, losses = self._eager(kl_weight(steps - 1, self.v["beta"], self.v["warmup"],
                                                         self.v["warmup_start"]))
            finite = (torch.isfinite(means).all(0) & torch.isfinite(losses)).tolist()
        finally:
            self._restore(states)
        for r, ok in enumerate(finite):
            if errors[r] is None and not ok:
                errors[r] = last_update(steps, self.v, results[r])

