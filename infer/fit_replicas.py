"""fit_replicas(): R independently seeded replicas of one model and guide, trained together in one process.

Replica r is the run fit(models[r], guides[r], data, seed=seeds[r], ...) would make: the same setup (seeding,
parameter reset, checks, in the same order, so the same initial parameters), the same noise (its own
torch.Generator, started in the state the single run's global RNG has at its first step, drawing what the single
run draws), the same learning-rate and KL schedules and an elementwise Adam, hence the same trajectory up to the
floating-point rounding of the batched matmuls. Changing R or a replica's neighbours does not change its
distribution. The replicas are stacked into one model and one guide with a replica batch dim (infer.replicas) and
stepped together: one graph of ops for all R instead of R.
"""
import random
import time
import warnings

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from .average import ParameterAverage, average_start
from .checks import check_arguments, checked_device, check_checkpoint_path, check_data
from .elbo import ClosedFormELBO
from . import engine
from .engine import check_plan
from .fit import fit
from .prepare import adam, prepare
from .recipe import learning_rate, recipe
from .result import FitResult, divergence, last_update, Window
from .runtime import training_settings
from .validate import refuse
from .replicas import ReplicaELBO, replica_parameters, stack, unstack
from .weights import kl_weight


def fit_replicas(models, guides, data, seeds, *, elbo=None, steps: int = None, lr: float = None,
                 lr_final: float = None, schedule: str = None, adam_betas=None, beta: float = 1.0, warmup: int = 0,
                 warmup_start: float = 0.0, log_every: int = 100, progress: bool = False, callback=None,
                 checkpoint_paths=None, checkpoint_every: int = 0, checkpoint_extras=None, threads=1,
                 device="cpu", on_start=None, average: float = None) -> list:
    """Train models[r] and guides[r] with seed seeds[r], for every r at once; return one entry per replica: its
    FitResult, or the DivergenceError that ended it (its .result holds the history up to the last good log).

    The arguments are fit()'s, each applying to every replica; `elbo` must be a ClosedFormELBO with lattice or qmc
    noise (the default is the recipe's). models and guides are R copies of one architecture built of nn.Linear
    and models.nets.LogGain layers (the built-in models, and the gaussian, meanfield and structured guides); any
    other module is refused in one line (ValueError) before training, as is a step whose stacked terms differ from
    the replicas' own. After training each replica's parameters are in its own model and guide.

    on_start() runs once, after every check and before the first step (e.g. to create the checkpoints' dirs).
    callback(r, step, row) runs at each log of replica r. With checkpoint_paths (a list of one file path per
    replica, in folders that exist before training, or once on_start has run), replica r's checkpoint is written
    every checkpoint_every steps (if > 0) and at the end (checkpoint_every=0: only at the end), holding what a
    single run's would (params under the single run's names, its own Adam moments, its generator's state as the
    torch RNG state, history, window), so it resumes as a single run with fit(resume=...) and seed seeds[r].

    Refused in one line before training (ValueError naming the argument): models, guides or seeds that are not
    lists, the same model or guide object for two replicas, checkpoint_paths that is not one path per replica,
    a callback or on_start that is not callable, data that is not the one-bit data."""
    _check_replica_arguments(models, guides, data, seeds, callback, checkpoint_paths, checkpoint_extras, on_start)
    R = len(seeds)
    if not (R >= 1 and len(models) == R and len(guides) == R):
        raise ValueError(f"replicas: got {len(models)} models, {len(guides)} guides and {R} seeds; give one of each "
                         "per replica")
    if len(set(seeds)) != R:
        raise ValueError(f"seeds={list(seeds)} is not allowed: replicas need distinct seeds")
    plan = recipe(models[0])
    v = dict(steps=plan.steps if steps is None else steps, lr=plan.lr if lr is None else lr,
             lr_final=plan.lr_final if lr_final is None else lr_final,
             schedule=plan.schedule if schedule is None else schedule,
             adam_betas=plan.betas if adam_betas is None else adam_betas, beta=beta, warmup=warmup,
             warmup_start=warmup_start, seed=seeds[0], log_every=log_every, checkpoint_every=checkpoint_every,
             threads=threads, init="reset", progress=progress, freeze_model=False, engine="auto",
             average=plan.average if average is None else average)
    single = elbo if elbo is not None else ClosedFormELBO(num_particles=plan.num_particles, noise=plan.noise)
    if type(single) is not ClosedFormELBO:
        raise ValueError(f"elbo={type(single).__name__} is not allowed with replicas: replicas train the closed-form "
                         "ELBO (objective=closed_form)")
    if single.noise == "mc" or not single.vectorize_particles:
        raise ValueError(f"noise={single.noise!r} is not allowed with replicas: replicas need noise drawn outside "
                         "the model and guide (lattice or qmc)")
    for r in range(R):
        check_arguments(models[r], guides[r], data, single, v["steps"], None, {**v, "seed": seeds[r]})
    if on_start is None:  # the folders must exist now; with on_start (which may create them), right after it
        for path in checkpoint_paths or ():
            check_checkpoint_path(path, "checkpoint_paths")
    device = checked_device(device)
    size = stack_size(R, single.num_particles, data)
    paths, extras = checkpoint_paths, checkpoint_extras or [None] * R
    started, out = [], []

    def start():  # once, after the first stack's setup (which refuses a guide that cannot stack) or before a fit
        if not started and on_start is not None:
            on_start()
            for path in checkpoint_paths or ():  # before any training: on_start was to create their folders
                check_checkpoint_path(path, "checkpoint_paths")
        started.append(True)

    for lo in range(0, R, size):  # each stack trains all its steps, then the next (the same results as lockstep)
        part = slice(lo, min(lo + size, R))

        def relay(r, step, row, lo=lo):
            callback(lo + r, step, row)

        relay = relay if callback is not None else None
        if part.stop - part.start == 1:  # a stack of one is its single run, trained by fit itself
            start()
            out += _one_by_one(models[part], guides[part], data, seeds[part], single, v, device,
                               paths[part] if paths else None, extras[part], relay, R)
            continue
        with training_settings(threads):
            group = _Replicas(models[part], guides[part], data, seeds[part], single, v, device,
                              paths[part] if paths else None, extras[part], group=R)
            start()
            out += group.train(relay)
    return out


def _one_by_one(models, guides, data, seeds, elbo, v, device, paths, extras, callback, replicas) -> list:
    """Each replica trained by fit() with its seed, one after another (a stack of one through the stacked
    machinery measured 10% slower than fit: 70.8 against 64.0 s for the dlgm at n = 1000); `replicas` is the
    group's size, which each result's recipe records."""
    from .result import DivergenceError

    out = []
    kw = {k: v[k] for k in ("steps", "lr", "lr_final", "schedule", "adam_betas", "beta", "warmup", "warmup_start",
                            "log_every", "progress", "threads", "average")}
    for r, seed in enumerate(seeds):
        try:
            result = fit(models[r], guides[r], data, elbo=elbo, seed=seed, device=device,
                         checkpoint_path=paths[r] if paths else None, checkpoint_every=v["checkpoint_every"],
                         checkpoint_extra=extras[r],
                         callback=(lambda step, row, r=r: callback(r, step, row)) if callback else None, **kw)
        except DivergenceError as err:
            out.append(err)
            continue
        result.recipe["replicas"] = replicas  # fit wrote the final checkpoint (also with checkpoint_every=0)
        out.append(result)
    return out


def _is_sequence(v) -> bool:
    """A list, tuple or other sequence of items (not a string, not a single model or guide)."""
    from collections.abc import Sequence

    return isinstance(v, (Sequence, torch.nn.ModuleList)) and not isinstance(v, (str, bytes))


def _check_replica_arguments(models, guides, data, seeds, callback, checkpoint_paths, checkpoint_extras,
                             on_start) -> None:
    """fit_replicas' own argument checks (one-line ValueErrors naming the argument), before any work; fit's checks
    of every replica's model, guide and settings follow."""
    check_data(data)
    for name, value in (("models", models), ("guides", guides), ("seeds", seeds)):
        if not _is_sequence(value):
            raise refuse(name, value, f"{name} must be a list with one entry per replica")
    for name, value in (("models", models), ("guides", guides)):
        items = list(value)
        for r, item in enumerate(items):
            first = next(i for i, other in enumerate(items) if other is item)
            if first != r:
                raise refuse(name, value, f"{name} must be distinct objects, one per replica (entries {first} and "
                                          f"{r} are the same {type(item).__name__}, whose params only one replica "
                                          "could hold): build one per replica")
    shared = {id(m) for m in models} & {id(g) for g in guides}
    if shared:
        raise ValueError("models and guides share an object: each replica needs its own model and its own guide")
    for name, fn, what in (("callback", callback, "a callable callback(replica, step, row), or None"),
                           ("on_start", on_start, "a callable on_start(), or None")):
        if fn is not None and (isinstance(fn, type) or not callable(fn)):
            raise refuse(name, fn, f"{name} must be {what}")
    R = len(seeds)
    if checkpoint_paths is not None:
        if not _is_sequence(checkpoint_paths) or len(checkpoint_paths) != R:
            raise refuse("checkpoint_paths", checkpoint_paths, f"checkpoint_paths must be a list of one path per "
                                                               f"replica ({R}), or None")
        import os

        for path in checkpoint_paths:
            if not isinstance(path, (str, os.PathLike)) or os.fspath(path) == "":
                raise refuse("checkpoint_paths", checkpoint_paths, "checkpoint_paths must hold file paths (str or "
                                                                   "pathlib.Path)")
        full = [os.path.abspath(os.fspath(p)) for p in checkpoint_paths]
        if len(set(full)) != R:
            raise refuse("checkpoint_paths", checkpoint_paths, "checkpoint_paths must be distinct: one file per "
                                                               "replica")
    if checkpoint_extras is not None and (not _is_sequence(checkpoint_extras) or len(checkpoint_extras) != R or any(
            e is not None and not isinstance(e, dict) for e in checkpoint_extras)):
        raise refuse("checkpoint_extras", checkpoint_extras, f"checkpoint_extras must be a list of one dict (or None) "
                                                             f"per replica ({R}), or None")


STACK_FLOATS = 2**20  # the largest activation of one stack (replicas x particles x data points x n floats, 4 MB)


def stack_size(replicas: int, particles: int, data) -> int:
    """How many replicas one stack holds: as many as keep its largest activation, the decoder's logits, within
    STACK_FLOATS, so that memory stays bounded as n grows. Measured on this 2-core machine (one thread, n = 1000,
    14000 steps): three dlgm replicas (128 particles, 3 MB of logits) stacked trained in 133 s against 178 s for
    the three one after another (0.75x); three vae replicas (32 particles) in 0.4-0.6x. A rule of sizes, not a
    timing, so that the same config always stacks (and rounds) the same way."""
    per_replica = particles * len(data.weights) * data.n
    return max(1, min(replicas, STACK_FLOATS // per_replica))


class _Replicas:
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
                    if list(terms) != names or not torch.allclose(means[:, r], want, rtol=1e-4, atol=1e-4):
                        raise ValueError(f"replica {r}'s stacked loss terms {means[:, r].tolist()} differ from its "
                                         f"own {want.tolist()}")
        except Exception as err:  # noqa: BLE001  any failure means the replica dim does not go through
            raise ValueError(f"{type(self.guides[0]).__name__} with {type(self.models[0]).__name__} cannot take a "
                             f"replica dimension ({(str(err).splitlines() or [''])[0]})") from None
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
                plan = self.elbo.traced_step(self.model, self.guide, self.xr, self.weights)
                args = plan.inputs(torch.as_tensor(self.beta0, dtype=torch.float32, device=self.x.device))
                want, got = plan.forward(*args), plan.graph(*args)
                grads = [torch.autograd.grad(out[1].sum(), self.params, allow_unused=True) for out in (want, got)]
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
        """(params, optimizer state_dict) of replica r, laid out as its single run's (the param store names, and
        Adam's state in the order of those params)."""
        roles = {"model": self.model, "guide": self.guide}
        views = {role: replica_parameters(module, r) for role, module in roles.items()}
        params = {name: views[role][attr] for name, role, attr in self.names}
        state, opt = {}, self.optimizer
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            of = {p: opt.state[p][key] for p in self.params if key in opt.state.get(p, {})}
            if len(of) == len(self.params):
                moments[key] = {role: replica_parameters(module, r, of) for role, module in roles.items()}
        for i, (name, role, attr) in enumerate(self.names):
            if moments:
                step = opt.state[self.params[0]]["step"]
                state[i] = {"step": step.clone(), **{k: m[role][attr].clone() for k, m in moments.items()}}
        group = {k: val for k, val in opt.state_dict()["param_groups"][0].items() if k != "params"}
        return params, {"state": state, "param_groups": [{**group, "params": list(range(len(self.names)))}]}

    def replica_average(self, r, averaged):
        """Replica r's running parameter average as its single run's (infer.average.ParameterAverage.state(), the
        means in the order of its params); None before the averaging starts."""
        def own(means):
            of = dict(zip(self.params, means))
            views = {role: replica_parameters(module, r, of) for role, module in (("model", self.model),
                                                                                   ("guide", self.guide))}
            return [views[role][attr] for _, role, attr in self.names]

        return averaged.state(own)

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
        results = [FitResult(optimizer=self.optimizer, buffers={}, engine=f"{self.engine}, {R} replicas stacked",
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
        with pyro.validation_enabled(False), warnings.catch_warnings():
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
                if self.plan is not None:
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


__all__ = ["fit_replicas"]
