"""The guide/model fit check: trace both once and refuse a guide that does not cover the model's latents."""
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample


class GuideMismatchError(ValueError):
    """A guide whose latent sites, shapes or reparameterisation do not fit its model."""


def latent_sites(trace):
    """Names of the non-observed sample sites of a trace, in order, without auxiliary guide sites."""
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
            and not site["infer"].get("is_auxiliary")]


def _trace(fn, x, role, how: str = ""):
    try:
        return poutine.trace(fn).get_trace(x)
    except Exception as err:  # noqa: BLE001  any failure of a user's callable is reported in one line
        first = (str(err).strip().splitlines() or [""])[0]
        raise GuideMismatchError(f"{role}(x) failed on data of shape {tuple(x.shape)}{how}: "
                                 f"{type(err).__name__}: {first}") from err


PARTICLES = 2  # the particles of the check that model and guide run as the objectives run them (check_particles)


def check_particles(model, guide, x) -> None:
    """Raise GuideMismatchError (one line) unless guide(x), then model(x) on the guide's draws, run with PARTICLES
    particles in a plate left of the data plate (dim -2), as the objectives run them: a guide that reshapes as if
    there were one particle, or draws the model cannot take (inf), is refused before training, not in its first
    step with a multi-line error. The caller's RNG is left as it was: a run's numbers do not depend on the check."""
    how = f" with {PARTICLES} vectorised particles (a plate at dim -2, left of the data plate, as the objectives draw"
    with torch.random.fork_rng(), pyro.validation_enabled(True), poutine.block(), \
            pyro.plate("num_particles_vectorized", PARTICLES, dim=-2):  # its draws leave the caller's RNG alone
        guide_trace = _trace(guide, x, "guide", how + " them)")
        _trace(poutine.replay(model, trace=guide_trace), x, "model", how + " them, on the guide's draws)")


def _base(fn):
    """The distribution under a site's Independent / masked / expanded wrappers."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _masked(site) -> bool:
    """Whether any of a site's log-density is masked out: a poutine.mask on the site, or a .mask() on its
    distribution (a MaskedDistribution anywhere in its wrappers) whose mask is not all true."""
    masks = [site.get("mask")]
    fn = site["fn"]
    while fn is not None:
        if isinstance(fn, dist.MaskedDistribution):
            masks.append(fn._mask)
        fn = getattr(fn, "base_dist", None)
    return any(m is not None and not bool(torch.as_tensor(m).all()) for m in masks)


def _scalar(scale) -> str:
    scale = torch.as_tensor(scale)
    return f"{scale.item():g}" if scale.numel() == 1 else f"a tensor of shape {tuple(scale.shape)}"


DATA_PLATE = "data"  # the plate every model and guide samples its per-point sites in


def plates(site):
    """The sorted names of the plates a site sits in (vectorised-particle plates left out)."""
    return sorted(f.name for f in site["cond_indep_stack"] if f.vectorized and not f.name.startswith("num_particles"))


def check_guide(model, guide, x) -> None:
    """Raise GuideMismatchError with a one-line message unless guide(x) runs and samples exactly model(x)'s latent
    sites, in the same plates, with the same shapes and dtypes, inside the model's support, each reparameterisable."""
    with pyro.validation_enabled(True), poutine.block():
        guide_trace = _trace(guide, x, "guide")
        model_trace = _trace(model, x, "model")
    seen = {role: [n for n, s in t.nodes.items() if s["type"] == "sample" and s["is_observed"]]
            for role, t in (("model", model_trace), ("guide", guide_trace))}
    fixed = [n for n in seen["guide"] if guide_trace.nodes[n]["infer"].get("_deterministic")]
    if fixed:
        raise GuideMismatchError(f"guide site '{fixed[0]}' is a pyro.deterministic: a guide here samples only the "
                                 "model's latent sites (compute derived values after training, from the draws)")
    if seen["guide"] and seen["model"]:
        raise GuideMismatchError(f"guide observes {', '.join(seen['guide'])}: a guide samples only the model's latent "
                                 "sites, with no obs= (the model observes x)")
    if seen["guide"]:
        raise GuideMismatchError("model and guide look swapped: the model must observe x (pyro.sample(..., obs=x)) "
                                 f"and the guide nothing (model observes: {', '.join(seen['model']) or 'nothing'}; "
                                 f"guide observes: {', '.join(seen['guide']) or 'nothing'})")
    want, have = latent_sites(model_trace), latent_sites(guide_trace)
    missing, extra = [s for s in want if s not in have], [s for s in have if s not in want]
    if missing or extra:
        parts = (([f"missing {', '.join(missing)}"] if missing else [])
                 + ([f"extra {', '.join(extra)}"] if extra else []))
        raise GuideMismatchError(f"guide does not fit the model: {'; '.join(parts)} "
                                 f"(model latent sites: {', '.join(want)}; guide: {', '.join(have) or 'none'})")
    # an autoguide's latent sites may be Deltas: deterministic functions of auxiliary sites, which carry the density
    auxiliary = [n for n, site in guide_trace.nodes.items()
                 if site["type"] == "sample" and site["infer"].get("is_auxiliary")]
    free = [n for n in want if not isinstance(_base(guide_trace.nodes[n]["fn"]), dist.Delta)]
    if auxiliary and len(free) == len(want):  # its density is in the loss, and no latent is a function of it
        raise GuideMismatchError(f"guide site '{auxiliary[0]}' is auxiliary (is_auxiliary=True) while every latent "
                                 f"site ({', '.join(free)}) has a density of its own: the loss is then no bound on "
                                 "log p(x); an auxiliary site must carry the density of latent sites that are "
                                 "deterministic functions of it (Deltas, as in Pyro's autoguides)")
    for name, site in guide_trace.nodes.items():  # a subsampled plate scales its sites: say that, not the scale
        fn = site.get("fn")
        if site["type"] == "sample" and site_is_subsample(site) and getattr(fn, "subsample_size", None) not in (
                None, getattr(fn, "size", None)):
            raise GuideMismatchError(f"guide plate '{name}' subsamples {fn.subsample_size} of its {fn.size} "
                                     "elements: every step needs both data points (the loss is their weighted sum); "
                                     "drop subsample_size")
    for name in [*auxiliary, *want]:
        scale = guide_trace.nodes[name]["scale"]
        if not bool(torch.all(torch.as_tensor(scale) == 1)):
            raise GuideMismatchError(f"guide site '{name}' is scaled (poutine.scale, scale={_scalar(scale)}): its "
                                     "log-density enters the loss scaled, so the loss is no bound on log p(x); "
                                     "remove the scale (train.beta weighs the KL)")
    for name in want:
        p, q = model_trace.nodes[name], guide_trace.nodes[name]
        if p["fn"].event_shape != q["fn"].event_shape or q["value"].shape != p["value"].shape:
            raise GuideMismatchError(f"guide site '{name}' has shape {tuple(q['value'].shape)} and event shape "
                                     f"{tuple(q['fn'].event_shape)}; the model's is {tuple(p['value'].shape)} "
                                     f"with event shape {tuple(p['fn'].event_shape)}")
        if q["value"].dtype != p["value"].dtype:
            got, want = (str(t["value"].dtype).removeprefix("torch.") for t in (q, p))
            raise GuideMismatchError(f"guide site '{name}' draws {got} values; the model's are {want} (build the "
                                     "guide's parameters and distributions in the model's dtype)")
        if plates(q) != plates(p):
            raise GuideMismatchError(f"guide site '{name}' is in plates {plates(q) or 'none'}; the model samples it "
                                     f"in plates {plates(p) or 'none'} (use the same pyro.plate names)")
        inside = p["fn"].support.check(q["value"])
        if not bool(inside.all()):
            raise GuideMismatchError(f"guide site '{name}' drew a value outside the model's support "
                                     f"{p['fn'].support} (guide: {type(q['fn']).__name__} with support "
                                     f"{q['fn'].support})")
    for name in auxiliary or want:  # the sites that carry q's density; a point mass makes log q = 0, a MAP fit
        if isinstance(_base(guide_trace.nodes[name]["fn"]), dist.Delta):
            raise GuideMismatchError(f"guide site '{name}' is a point mass (Delta): it has no density, so its ELBO is "
                                     "no bound on log p(x); use a guide with a density (e.g. guide=gaussian)")
        if _masked(guide_trace.nodes[name]):
            raise GuideMismatchError(f"guide site '{name}' is masked (poutine.mask or .mask()): its log-density is "
                                     "left out of the ELBO, so the loss is no bound on log p(x); unmask it")
    for name, site in guide_trace.nodes.items():
        if name in have and not site["fn"].has_rsample:
            raise GuideMismatchError(f"guide site '{name}' ({type(site['fn']).__name__}) is not reparameterisable; "
                                     "the objectives need rsample()")
    check_particles(model, guide, x)
