"""The encodings of a trained pair as ArviZ InferenceData: guide samples per data point, prior samples, and
(when available) the exact densities on grids.

Groups of the InferenceData that encodings() returns:

* posterior: every latent site of the guide, dims (chain, draw, x, <site>_dim), coords x = ["x0=0^n", "x1=1^n"];
* prior: every latent site of the model's prior (for the DLGM z1 that is the learned marginal p(z1)),
  dims (chain, draw, <site>_dim);
* sample_stats: log_weight = log p(x_k, z) - log q(z|x_k) of each posterior draw, dims (chain, draw, x); with it the
  true posterior can be estimated from guide draws by (Pareto-smoothed) importance weighting;
* constant_data: the data weights w, dim x;
* exact_densities (only when `grids` is given): per scalar latent site a grid <site>_grid and the densities
  <site>_prior, <site>_aggregate (on the grid), <site>_q and <site>_posterior (per x).

attrs: n, weights, latent_sites (model order, top latent first), estimator; and, when the run's PSIS diagnostics are
given, khat (one per data point) and khat_samples, so figures show the run's one k-hat, not one of their own.
"""
import warnings

import numpy as np
import torch

from infer.runtime import serial_blas

from .psis import _sample_sites, log_weights_from_traces, sample_traces

GROUP_EXACT = "exact_densities"


def point_labels(points: int = 2) -> list:
    """The data point coordinate values: x0 = 0^n, x1 = 1^n."""
    return [f"x{k}={k}^n" for k in range(points)]


def _values(site, samples: int, points: int, prior: bool = False) -> np.ndarray:
    """A latent site's values as (samples, points, d) numpy; for the prior (samples, d), from the first data point
    (every point draws from the same prior)."""
    v = site["value"].detach().double()
    event = tuple(site["fn"].event_shape)
    v = torch.broadcast_to(v, (samples, points) + event).reshape(samples, points, -1)
    return v[:, 0].numpy() if prior else v.numpy()


def _first(d: dict, *keys):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def densities_dataset(grids: dict, labels=None):
    """exact.posterior_grid's output as an xarray Dataset (see the module doc for its variables).

    `grids` maps a scalar latent site to a dict with the grid ("grid" or "z" or "values"), "prior" p(site),
    "q" (q(site|x_k), one row per k), "aggregate" q(site) and "posterior" p(site|x_k) (one row per k);
    missing entries are left out. Names such as q_given_x / q_agg / true_posterior are accepted too."""
    import xarray as xr

    data_vars, coords = {}, {}
    for site, g in grids.items():
        if not isinstance(g, dict):
            continue
        grid = _first(g, "grid", "z", "values", "points", site)
        if grid is None:
            raise ValueError(f"exact densities of site '{site}' have no grid (keys: {', '.join(g)})")
        grid = np.asarray(grid, dtype=float).reshape(-1)
        gdim = f"{site}_grid"
        coords[gdim] = grid
        parts = {"prior": _first(g, "prior", "p", "prior_marginal", "p_marginal"),
                 "aggregate": _first(g, "aggregate", "q_agg", "q_aggregate", "aggregate_q", "q_marginal"),
                 "q": _first(g, "q", "q_given_x", "q_cond", "encoder", "q_x"),
                 "posterior": _first(g, "posterior", "true_posterior", "p_given_x", "p_post", "exact_posterior")}
        for name, value in parts.items():
            if value is None:
                continue
            value = np.asarray(value, dtype=float)
            if name in ("q", "posterior"):
                value = value.reshape(-1, grid.size)
                labels_k = labels or point_labels(value.shape[0])
                coords.setdefault("x", labels_k)
                data_vars[f"{site}_{name}"] = (("x", gdim), value)
            else:
                data_vars[f"{site}_{name}"] = ((gdim,), value.reshape(grid.size))
    return xr.Dataset(data_vars, coords=coords)


def encodings(model, guide, data, samples: int = 2000, grids: dict = None, chunk: int = 5000, khat: dict = None):
    """Guide and prior samples of every latent (and the exact densities when `grids` is given) as InferenceData.

    samples: draws per data point (one chain). grids: the output of exact.posterior_grid(model, guide, data).
    khat: the run's PSIS diagnostics (evaluate()'s metrics['psis']), kept in attrs for the figures. Draws are
    traced at most montecarlo.particles_per_chunk(n) at a time, so memory stays bounded for any n. Refused in one
    line before any work (ValueError naming the argument): samples or chunk not an integer >= 1, and data, model
    and guide as infer.checks.check_inputs refuses them."""
    from infer.checks import check_inputs
    from infer.validate import check

    check("chunk", samples, label="samples")
    check("chunk", chunk)
    check_inputs(model, guide, data)
    with serial_blas():  # torch's thread count changes no number (infer.runtime.serial_blas)
        return _encodings(model, guide, data, samples, grids, chunk, khat)


def _encodings(model, guide, data, samples, grids, chunk, khat):
    import arviz as az

    from .montecarlo import particles_per_chunk

    x, points = data.x, data.x.shape[-2]
    chunk = min(chunk, particles_per_chunk(data.n, points))
    labels = point_labels(points)
    post, prior, lw = {}, {}, []
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        guide_trace, model_trace = sample_traces(model, guide, x, size)
        _, prior_trace = sample_traces(model, _no_guide, x, size)
        for name, site in _sample_sites(model_trace, observed=False):
            if name in guide_trace.nodes:
                post.setdefault(name, []).append(_values(guide_trace.nodes[name], size, points))
            prior.setdefault(name, []).append(_values(prior_trace.nodes[name], size, points, prior=True))
        lw.append(log_weights_from_traces(guide_trace, model_trace, size, points))
    order = list(post)
    posterior = {k: np.concatenate(v)[None] for k, v in post.items()}
    prior_d = {k: np.concatenate(v)[None] for k, v in prior.items()}
    dims = {k: ["x", f"{k}_dim"] for k in order}
    prior_dims = {k: [f"{k}_dim"] for k in order}
    coords = {"x": labels, **{f"{k}_dim": np.arange(posterior[k].shape[-1]) for k in order}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_dict(
            posterior=posterior, sample_stats={"log_weight": np.concatenate(lw, axis=1).T[None]},
            constant_data={"w": data.w.double().numpy()}, coords=coords,
            dims={**dims, "log_weight": ["x"], "w": ["x"]})
        idata.add_groups(prior=az.from_dict(posterior=prior_d, coords=coords, dims=prior_dims).posterior)
        if grids:
            idata.add_groups({GROUP_EXACT: densities_dataset(grids, labels)})
    idata.attrs.update({"n": int(data.n), "weights": list(map(float, data.weights)), "latent_sites": order,
                        "estimator": f"guide and prior samples, {samples} per data point"
                                     + ("; exact densities by quadrature" if grids else "")})
    if khat and not khat.get("narrow"):  # a q of bounded support: its k-hat says nothing (psis.narrow_support)
        idata.attrs.update({"khat": [float(k) for k in khat["khat"]], "khat_samples": int(khat["samples"]),
                            "khat_joint": int(bool(khat.get("joint")))})  # one k-hat of q(z_0, z_1): both points
    return idata


def _no_guide(x):
    """An empty guide: replaying it leaves the model to draw every latent from its prior."""


def save(idata, path="encodings.nc"):
    """Write the InferenceData to netCDF (h5netcdf, as arviz's to_netcdf lays it out: its attrs at the root, each
    group compressed); attrs that netCDF cannot hold are stored as strings. The file is built in memory and written
    by Python through a temporary file renamed into place (analysis.rundir.write_atomic), so that a full disk is one
    OSError and no half file: HDF5 writing to a full disk prints tracebacks and can crash the process at exit."""
    import io
    import json

    import xarray as xr

    from .rundir import write_atomic

    attrs = {k: (json.dumps(v) if isinstance(v, (list, dict, tuple)) else v) for k, v in idata.attrs.items()}
    buffer, mode = io.BytesIO(), "w"
    if attrs:
        xr.Dataset(attrs=attrs).to_netcdf(buffer, mode=mode, engine="h5netcdf", group="/")
        mode = "a"
    for group in idata._groups_all:
        data = getattr(idata, group)
        compress = {name: {"zlib": True} for name, values in data.variables.items() if values.dtype.kind in "biufcS"}
        data.to_netcdf(buffer, mode=mode, group=f"//{group}", engine="h5netcdf", encoding=compress)
        mode = "a"
    write_atomic(path, buffer.getvalue())
    return path


def load(path):
    """Read an encodings.nc written by save(), restoring the list-valued attrs."""
    import json

    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_netcdf(str(path), engine="h5netcdf")
    for k, v in list(idata.attrs.items()):
        if isinstance(v, str) and v[:1] in "[{":
            try:
                idata.attrs[k] = json.loads(v)
            except ValueError:
                pass
    return idata


def top_site(idata) -> str:
    """The top latent (the one with the fixed N(0, I) prior): the first the model samples."""
    sites = idata.attrs.get("latent_sites") or list(idata.posterior.data_vars)
    return sites[0]


def summary(idata, hdi_prob: float = 0.94):
    """ArviZ's summary table (mean, sd, hdi) of the encodings: q(z|x_k) per data point and the prior p(z)."""
    import arviz as az
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = az.summary(idata, group="posterior", kind="stats", hdi_prob=hdi_prob)
        p = az.summary(idata, group="prior", kind="stats", hdi_prob=hdi_prob)
    q.index = [f"q: {i}" for i in q.index]
    p.index = [f"p: {i}" for i in p.index]
    return pd.concat([q, p])


def summary_text(idata, hdi_prob: float = 0.94) -> str:
    """summary() as text for the log, headed with its estimator."""
    return (f"encodings (ArviZ summary of {idata.attrs.get('estimator', 'samples')}; q = guide, p = model prior)\n"
            + summary(idata, hdi_prob).to_string())
