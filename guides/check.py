"""The guide/model fit check: trace both once and refuse a guide that does not cover the model's latents."""
import pyro
from pyro import poutine
from pyro.poutine.util import site_is_subsample


class GuideMismatchError(ValueError):
    """A guide whose latent sites, shapes or reparameterisation do not fit its model."""


def latent_sites(trace):
    """Names of the non-observed sample sites of a trace, in order, without auxiliary guide sites."""
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
            and not site["infer"].get("is_auxiliary")]


def check_guide(model, guide, x) -> None:
    """Raise GuideMismatchError with a one-line message unless guide(x) samples exactly model(x)'s latent sites,
    with the same shapes, each reparameterisable."""
    with pyro.validation_enabled(True), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(model).get_trace(x)
    want, have = latent_sites(model_trace), latent_sites(guide_trace)
    missing, extra = [s for s in want if s not in have], [s for s in have if s not in want]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"extra {', '.join(extra)}"] if extra else [])
        raise GuideMismatchError(f"guide does not fit the model: {'; '.join(parts)} "
                                 f"(model latent sites: {', '.join(want)}; guide: {', '.join(have) or 'none'})")
    for name in want:
        p, q = model_trace.nodes[name], guide_trace.nodes[name]
        if p["fn"].event_shape != q["fn"].event_shape or q["value"].shape[-len(p["value"].shape):] != p["value"].shape:
            raise GuideMismatchError(f"guide site '{name}' has shape {tuple(q['value'].shape)} and event shape "
                                     f"{tuple(q['fn'].event_shape)}; the model's is {tuple(p['value'].shape)} "
                                     f"with event shape {tuple(p['fn'].event_shape)}")
    for name, site in guide_trace.nodes.items():
        if name in have and not site["fn"].has_rsample:
            raise GuideMismatchError(f"guide site '{name}' ({type(site['fn']).__name__}) is not reparameterisable; "
                                     "the objectives need rsample()")
