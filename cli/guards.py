"""A run's two guards: check_memory refuses, from the config alone, a run whose training step would not fit in
memory_gb; divergence says why a trained run counts as diverged ('' when it does not).
"""

from omegaconf import OmegaConf

from cli.state import ConfigError

# peak memory of a training step, measured (vae, n = 3e5 and 1e6, 32 particles: 0.85 and 2.05 GB peak RSS):
MEMORY_BASE = 256 * 2**20  # the interpreter, torch and pyro
MEMORY_PER_PARAM = 16  # a param, its grad and Adam's two moments, float32
MEMORY_PER_PARTICLE_BIT = 20  # bytes per (particle x data point x bit): logits, log-probs and their grads


def network_params(cfg, build) -> int:
    """The number of params of the model and guide `build(cfg)` makes, without building them at cfg's data.n: every
    network's params are affine in n (its n-wide layers), so they are counted on networks built at n = 1 and
    n = 2 (a few kB) and extrapolated, exactly. Lazy guides (autonormal, autoiaf) count as their model alone.
    Networks so wide that even those cannot be allocated are refused (ConfigError, one line naming the widths)."""
    import torch

    counts = []
    for n in (1, 2):
        small = OmegaConf.merge(cfg, {"data": {"n": n}})
        try:
            _, model, guide = _build_on_meta(build, small)
        except Exception as err:  # noqa: BLE001  e.g. hydra's InstantiationException around torch's RuntimeError
            cause = err.__cause__ or err.__context__ or err
            if not ("allocate" in str(cause) or "overflow" in str(cause) or isinstance(cause, MemoryError)):
                raise
            raise ConfigError(f"the networks these settings describe cannot be allocated even at data.n={n} (torch: "
                              f"out of memory): memory_gb={cfg.memory_gb} fits far less; lower the model.* and "
                              "guide.* widths (hidden, upper_hidden, prior_hidden, ...)") from None
        counts.append(sum(p.numel() for m in (model, guide) if isinstance(m, torch.nn.Module)
                          for p in m.parameters()))
    return counts[0] + (counts[1] - counts[0]) * (int(cfg.data.n) - 1)


def _build_on_meta(build, cfg):
    """build(cfg) on torch's meta device (shapes only: nothing is allocated, so no width is too wide to count), or
    on the CPU where a network cannot be built there (pyro's spline flows call .item() on their init)."""
    import torch

    try:
        with torch.device("meta"):
            return build(cfg)
    except Exception as err:  # noqa: BLE001  hydra's InstantiationException around torch's RuntimeError
        cause = err.__cause__ or err.__context__ or err
        if "meta" not in str(cause):
            raise
    return build(cfg)


def memory_refusal(n, memory_gb, base_bytes, per_n_bytes, params, particles,
                   particles_key: str = "train.num_particles") -> str:
    """The one-line reason a run of data length n does not fit memory_gb, or '' if it fits. The need is modelled as
    base_bytes + per_n_bytes * n (the interpreter and libraries, then the n-wide params and particle tensors);
    `params` and `particles` are only quoted. Where some data.n >= 1 fits, the largest is named; where none does
    (memory_gb below the base, or the particles alone too large at n = 1), the message says what must change
    instead, never an impossible 'data.n <= 0'."""
    gib = 2 ** 30
    budget, need = memory_gb * gib, base_bytes + per_n_bytes * n
    if need <= budget:
        return ""
    head = (f"data.n={n} needs about {need / gib:.3g} GB to train ({params:,} params, {particles:,} particles); "
            f"memory_gb={memory_gb}")
    if budget <= base_bytes:
        return (f"{head} is below the {base_bytes / gib:.2g} GB any run needs (the interpreter, torch and pyro): "
                f"raise memory_gb above {base_bytes / gib:.2g}")
    fits = int((budget - base_bytes) // per_n_bytes)
    if fits < 1:
        return (f"{head} does not fit even data.n=1 with these settings: lower {particles_key} or the networks' "
                "widths (model.hidden, guide.hidden, ...), or raise memory_gb")
    return (f"{head} fits data.n <= {fits:,} with these settings: lower data.n or {particles_key}, or raise "
            "memory_gb")


def check_memory(cfg, build) -> None:
    """Refuse, before any network is built at data.n, a run whose training step would need more than memory_gb
    (peak RSS): the base, the networks' params (network_params: their n-wide layers dominate) and the particles'
    n-wide tensors. Evaluation is chunked and stays below that peak. Raises ConfigError (one line)."""
    from models import OneBit

    data = OneBit(cfg.data.n, tuple(cfg.data.weights))
    params = network_params(cfg, build)
    particles_key = "objective.K" if "K" in cfg.objective else "train.num_particles"
    particles = OmegaConf.select(cfg, particles_key)
    if "nodes" in cfg.objective:  # objective=exact: its lattice, nodes (x inner_nodes where z1 has its own), is the
        #                           model phase's particles
        particles_key = "objective.nodes"
        particles = cfg.objective.nodes * (cfg.objective.get("inner_nodes", 1) if cfg.model.name == "dlgm" else 1)
    replicas = cfg.get("replicas", 1)
    if replicas > 1:  # every replica's own networks and their stacked copies; one stack's particles at a time
        from infer.fit_replicas import stack_size

        params, particles = 2 * replicas * params, stack_size(replicas, particles, data) * particles
    per_n = (MEMORY_PER_PARAM * params + MEMORY_PER_PARTICLE_BIT * particles * 2 * data.n) / data.n
    reason = memory_refusal(data.n, cfg.memory_gb, MEMORY_BASE, per_n, params, particles,
                            particles_key=particles_key)
    if reason:
        raise ConfigError(reason)


def divergence(result, data, beta: float = 1.0, final=None, cfg=None) -> str:
    """Why a trained run counts as diverged ('' if it does not): infer.result.worse_than_no_latent, judged by the
    run's own objective where it is tighter than the ELBO (objective=iwae), with what to change: optim.lr, and the
    settings besides it that scale an update, where the run moves them (step_suspects)."""
    from infer.result import worse_than_no_latent

    objective = cfg.get("objective", {}).get("name") if cfg is not None else None
    reason = worse_than_no_latent(result, data, beta, final, objective=objective)
    return f"{reason}; lower optim.lr{step_suspects(cfg)}" if reason else ""


# the keys whose values set the initial parameters and the loss's scale: the suspects of a loss that is not finite
# before any update (infer.result.divergence, cause 'init')
INIT_SUSPECTS = ("model", "guide", "data", "objective", "train.beta", "train.warmup_start")
STEP_SUSPECTS = ("optim.betas",)  # what else shapes an update's size, besides the learning rate a divergence names


def explained(err, cfg, text: str = None) -> str:
    """err's one line (text, where given), with init_suspects(cfg) appended where the cause is a setting no check
    names by itself: a loss not finite at the initial parameters (a DivergenceError with cause 'init') or a model or
    guide that failed on the data before any training (guides.check: 'model(x) failed ...'); and, for a divergence
    blamed on the learning rate (cause 'lr'), the other settings that scale an update (STEP_SUSPECTS) where the run
    moves them from their defaults."""
    text = str(err) if text is None else text
    if cfg is None:
        return text
    cause = getattr(err, "cause", None)
    if cause == "init" or text.startswith(("model(x) failed", "guide(x) failed")):
        return text + init_suspects(cfg)
    if cause == "lr":  # the update diverged: Adam's betas scale it too
        return text + step_suspects(cfg)
    return text


def step_suspects(cfg) -> str:
    """'; this run also sets optim.betas=... away from their defaults': the settings besides the learning rate
    that scale an update (STEP_SUSPECTS), where this run moves them ('' for none, or no cfg)."""
    return "" if cfg is None else init_suspects(cfg, STEP_SUSPECTS, lead="this run also sets")


def init_suspects(cfg, keys=INIT_SUSPECTS, lead: str = "this run sets") -> str:
    """'; <lead> k=v, ... away from their defaults' for the `keys` (and the keys under them) whose values
    differ from the config composed with the same model, guide and objective ('' where none does, or where that
    composition fails): what a DivergenceError at the initial parameters cannot name by itself."""
    from cli.keys import compose_config

    try:
        default = compose_config([f"model={cfg.model.name}", f"guide={cfg.guide.name}",
                                  f"objective={cfg.objective.name}"])
    except Exception:  # noqa: BLE001  a hint only: a config that does not recompose gets none
        return ""

    def leaves(node, prefix):
        value = OmegaConf.select(node, prefix, default=None) if prefix else node
        if OmegaConf.is_dict(value):
            return {k: v for key in value for k, v in leaves(node, f"{prefix}.{key}").items()}
        return {prefix: OmegaConf.to_container(value) if OmegaConf.is_config(value) else value}

    changed = []
    for key in keys:
        have, want = leaves(cfg, key), leaves(default, key)
        changed += [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in have.items() if k in want and want[k] != v]
    return f"; {lead} {', '.join(changed)} away from their defaults" if changed else ""
