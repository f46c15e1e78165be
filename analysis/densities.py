"""Site log-densities of a model and guide on grids of latent values, and the checks before any quadrature.

Densities reads every site by tracing the model and the guide under poutine.condition, so any guide that samples
the model's latent sites works, at values of the quadrature's coordinates (analysis.coordinates: the sites, or the
two scalars of one site); the model's Bernoulli likelihood and Normal sites are float64 (qdensity.log_prob64)
and each evaluation is chunked so that no per-bit tensor exceeds MAX_ELEMENTS elements, whatever n. The model and guide
are fed on the dtype and device of their parameters (parameter_place: the data and the latent values cast there; a
float32 model gets float32 inputs, a float64 model float64 ones), and every log-density comes back float64 on the
data's device, where the quadrature runs. JointMarginal gives the per-point marginals and the entropy of a joint
guide; check_call the refusals (one-line ValueError) of every public function of analysis.exact, before any work
(sample_range, the integration range of draws, lives in analysis.shared_draws and is re-exported here).
"""

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .base_noise import BaseNoise
from .coordinates import Coordinates
from .qdensity import GuideDensity, log_prob64
from .quadrature import GAUSS7_W, KRONROD_W, KRONROD_X, lse
from .shared_draws import draws, sample_range  # noqa: F401  sample_range: re-exported

MASS_TOLERANCE = 1e-3  # q(.|x_k) must integrate to 1 within this on a grid, or exact() and surgery() refuse it
CHUNK = 400_000  # latent points per model/guide evaluation (at most; fewer where the data are wide, see rows())
MAX_ELEMENTS = 2 ** 24  # elements of the largest per-bit tensor of one model evaluation (latent values x N x n):
#                          memory is bounded for any n (a float64 tensor of this size is 128 MiB)
SPLIT_ELEMENTS = 2 ** 20  # the same, split site: its decoder runs on every point (20 us each at n=1000, 37 at 2^26)


def parameter_place(model, guide, x: torch.Tensor) -> tuple:
    """(dtype, device) the model and guide compute in: those of the model's first floating-point parameter, else the
    guide's (a torch.nn.Module's parameters; a plain function has none), else those of the data x."""
    for fn in (model, guide):
        if isinstance(fn, torch.nn.Module):
            for p in fn.parameters():
                if p.is_floating_point():
                    return p.dtype, p.device
    return x.dtype, x.device


class DataOn:
    """The one-bit data as the model and guide are fed: x (2, n) cast to `dtype` on `device`; n, weights and w are
    the data's own (the weights stay on the data's dtype and device, where the quadrature sums)."""

    def __init__(self, data, dtype: torch.dtype, device: torch.device):
        self.data, self.n, self.weights, self.w = data, data.n, data.weights, data.w
        self.x = data.x.to(dtype=dtype, device=device)


def fed(model, guide, data):
    """The data as model and guide are fed (see parameter_place): `data` itself where its x already has their dtype
    and device (float32 models on the one-bit data: nothing is copied), else a DataOn. data must have passed
    infer.checks.check_data."""
    x = data.x
    dtype, device = parameter_place(model, guide, x)
    return data if (x.dtype, x.device) == (dtype, device) else DataOn(data, dtype, device)


def check_call(model, guide, data, **values) -> None:
    """The checks of every public function of analysis.exact (exact, evidence, surgery, posterior_grid), before
    any work, each a one-line ValueError naming the problem: the arguments `values` (infer.validate: tol a finite
    number > 0, points an integer >= 2), then data, model and guide (infer.fit.check_inputs: the data's n, the
    guide's sites, shapes, plates, support and density; the model and guide traced on the data cast to the dtype and
    device of their parameters, see fed)."""
    from infer.checks import check_data, check_inputs
    from infer.validate import check

    for name, value in values.items():
        check(name, value)
    check_data(data)  # before fed() reads data.x
    check_inputs(model, guide, fed(model, guide, data))


class Densities:
    """Site log-densities of a model and guide on grids of latent values, read through poutine.condition/trace.

    The model and guide are fed on `dtype` and `device` (parameter_place: their parameters'): x is the data cast
    there, and so are the latent values (fed); every log-density and draw comes back float64 on `home`, the data's
    device (back)."""

    def __init__(self, model, guide, data, need_q: bool = True):
        self.model, self.guide, self.data = model, guide, data
        self.x = fed(model, guide, data).x
        self.dtype, self.device, self.home = self.x.dtype, self.x.device, data.x.device
        with torch.no_grad(), torch.random.fork_rng(), poutine.block():
            mt = poutine.trace(model).get_trace(self.x)

        def sample_sites(tr, observed):
            return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
                    and bool(s["is_observed"]) == observed]

        self.latents, self.observed = sample_sites(mt, False), sample_sites(mt, True)
        # raises ValueError for a guide whose density cannot be read; need_q=False: only the guide's draws are used
        self.q = GuideDensity(model, guide, self.x) if need_q else None
        points = self.x.shape[-2]
        sizes = {n: mt.nodes[n]["value"].numel() // points for n in self.latents}
        self.coords = Coordinates(sizes)  # ValueError for more than 2 scalars per data point
        names = self.coords.names
        self.joint = need_q and self.q.kind == "joint"
        if self.joint and len(names) > 1:
            raise ValueError(f"the guide ({type(guide).__name__}) is one joint density over {len(names)} "
                             f"scalar latents x {points} data points; q({', '.join(names)}|x_k) is its marginal, an "
                             f"integral over the other point's {len(names)} scalars at every node, so the "
                             f"quadrature would be {len(names) * points}-D")
        # the quadrature's coordinates (analysis.coordinates): the sites, or the two scalars of one split site
        self.bottom = names[-1]  # u, integrated outside: the parent of x (z, z1), or the split site's z[1]
        self.top = self.latents[0]  # the latent site whose prior has no parents (z, z2)
        self.other = names[0] if len(names) == 2 else None  # v, integrated inside (z2, or z[0])
        self.w = data.w.double()
        if self.joint and not bool(torch.allclose(self.w, self.w.mean())):
            raise ValueError("a joint guide couples the data points: its loss is defined for equal data weights only")
        self.marginal = None
        # elements of the observed sites for one value of the latents per data point (N x n for the one-bit data):
        # the width of the model's per-bit tensors, which bounds how many latent values one evaluation may hold
        self.width = max(1, sum(mt.nodes[n]["value"].numel() for n in self.observed))
        self.base = None  # the bottom site's base noise, when the guide samples it from a flow (see qdensity)
        if need_q and self.q.kind == "direct":
            with torch.no_grad(), torch.random.fork_rng(), poutine.block():
                gt = poutine.trace(guide).get_trace(self.x)
            self.base = BaseNoise.of(gt, self.bottom, self.latents, self.home)

    def rows(self, per_row: int = 2) -> int:
        """How many rows of latent values (one per data point for the parent of x, with per_row latent points in all)
        one model evaluation may take: at most CHUNK latent points, and at most MAX_ELEMENTS elements in the per-bit
        tensors (rows x width). The decoder of a split site (analysis.coordinates) runs on every latent point, not
        on the rows' u alone, so its per-bit tensors are rows x per_row / 2 x width, held to SPLIT_ELEMENTS."""
        if self.coords.split is None:
            return max(1, min(CHUNK // per_row, MAX_ELEMENTS // self.width))
        return max(1, min(CHUNK // per_row, SPLIT_ELEMENTS // (self.width * max(1, per_row // 2))))

    def fed(self, values: dict) -> dict:
        """{site: value (..., 2, event)}: coordinate values {name: (..., 2)} (last dim = data point) cast to the dtype
        and device the model and guide are fed on, as site values with their event dim (Coordinates.sites)."""
        return self.coords.sites({k: v.to(device=self.device, dtype=self.dtype) for k, v in values.items()})

    def back(self, t: torch.Tensor) -> torch.Tensor:
        """t as the quadrature takes it: float64 on the data's device (t itself where it is already)."""
        return t.to(device=self.home, dtype=torch.float64)

    def logs(self, values: dict, parts=("q", "p")) -> dict:
        """{'q:site' | 'p:site': float64 log-density} for every guide/model site at the given latent values.

        values maps each coordinate (a site, or a coordinate of a split site: self.coords) -> float64 tensor (..., 2)
        (last dim = data point); shapes broadcast. The model and guide see them cast to their dtype (fed); the
        log-densities are float64 on the data's device (back)."""
        vals = self.fed(values)
        out = {}
        with torch.no_grad(), poutine.block():
            if "q" in parts and self.joint:
                out["q:" + self.bottom] = self._marginal()(values[self.bottom])
            elif "q" in parts:
                out.update({"q:" + n: self.back(v) for n, v in self.q.log_prob(vals).items()})
            if "p" in parts:
                tr = poutine.trace(poutine.condition(self.model, data=vals)).get_trace(self.x)
                for n in self.latents + self.observed:
                    out["p:" + n] = self.back(log_prob64(tr.nodes[n]))
        return out

    def _marginal(self) -> "JointMarginal":
        if self.marginal is None:
            self.marginal = JointMarginal(self.q, self.bottom, self.samples()["q:" + self.bottom], self.home)
        return self.marginal

    def samples(self, count: int = 4096, seed: int = 0) -> dict:
        """Draws of every coordinate from the guide ('q:name', shape (count, 2)) and the model prior ('p:name'), plus
        the log-likelihood of each prior draw ('p:loglik'); fixed seed, so results are deterministic (made once per
        evaluation inside analysis.shared_draws.shared_draws())."""
        key = (count, seed, self.dtype, str(self.device), tuple(self.latents), tuple(self.observed))
        return draws(key, lambda: self._samples(count, seed))

    def _samples(self, count: int, seed: int) -> dict:
        out = {}
        step = self.rows(2)  # model draws per evaluation (all of them unless the data are wide)
        with torch.no_grad(), torch.random.fork_rng(), poutine.block():
            torch.manual_seed(seed)
            with pyro.plate("_exact_particles", count, dim=-2):
                gt = poutine.trace(self.guide).get_trace(self.x)
            prior, loglik = {n: [] for n in self.latents}, []
            for start in range(0, count, step):
                with pyro.plate("_exact_particles", min(step, count - start), dim=-2):
                    mt = poutine.trace(self.model).get_trace(self.x)
                for n in self.latents:
                    value = mt.nodes[n]["value"].detach()
                    prior[n].append(value.reshape(value.shape[0], -1))
                loglik.append(sum(self.back(mt.nodes[n]["fn"].log_prob(mt.nodes[n]["value"])) for n in self.observed))
        for n in self.latents:  # AutoDelta's value is a param: detached
            out.update({"q:" + k: self.back(v) for k, v in self.coords.draws(n, gt.nodes[n]["value"].detach(),
                                                                             count).items()})
            out.update({"p:" + k: self.back(v) for k, v in self.coords.draws(n, torch.cat(prior[n]), count).items()})
        out["p:loglik"] = torch.cat(loglik)
        return out


MARGINAL_PANELS = 128  # Gauss-Kronrod panels per point for the marginals of a joint guide


class JointMarginal:
    """The marginals q(z|x_k) = integral of q(z_0, z_1) over the other point's z, and the joint entropy, of a joint
    guide (one density over both data points, e.g. AutoIAFNormal) with one scalar latent per point: Gauss-Kronrod 15
    on MARGINAL_PANELS uniform panels over each point's range (10 robust standard deviations beyond its draws).
    The guide is fed on the dtype and device of its data (density.x); the results are float64 on `home`."""

    def __init__(self, density: GuideDensity, site: str, draws: torch.Tensor, home=None):
        if draws.shape[1] != 2:
            raise ValueError(f"joint-guide marginals are implemented for 2 data points, got {draws.shape[1]}")
        self.q, self.site = density, site
        self.home = draws.device if home is None else home
        self.nodes, self.logw = [], []  # per point: nodes (M,), log weights (2, M): Kronrod, Gauss
        for k in range(2):
            lo, hi = sample_range(draws[:, k])
            edges = torch.linspace(lo, hi, MARGINAL_PANELS + 1, dtype=torch.float64)
            half = (edges[1:] - edges[:-1])[:, None] / 2
            self.nodes.append(((edges[1:] + edges[:-1])[:, None] / 2 + half * KRONROD_X).reshape(-1))
            self.logw.append(torch.stack([(half * KRONROD_W).reshape(-1).log(), (half * GAUSS7_W).reshape(-1).log()]))

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z_0, z_1) at z (..., 2), float64 (...)."""
        flat = z.reshape(-1, 2)
        x = self.q.x
        out = [self.q.log_joint({self.site: c.to(device=x.device, dtype=x.dtype)[..., None]}).to(
            device=self.home, dtype=torch.float64) for c in flat.split(CHUNK)]
        return torch.cat(out).reshape(z.shape[:-1])

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """log q(z_k = v_k|x) for v (..., 2): a float64 tensor (..., 2)."""
        flat, out = v.reshape(-1, 2), []
        for k in range(2):
            b = self.nodes[1 - k]
            z = torch.empty(flat.shape[0], len(b), 2, dtype=torch.float64)
            z[..., k], z[..., 1 - k] = flat[:, k:k + 1], b
            out.append(lse(self.log_joint(z) + self.logw[1 - k][0], -1))
        return torch.stack(out, -1).reshape(v.shape)

    def check(self) -> dict:
        """On the tensor product of the two points' rules: 'entropy' H[q(z_0, z_1)] and its K15 - G7 difference
        'entropy_error'; 'mass' (should be 1: a deficit means q reaches beyond the ranges); 'marginal_error', the
        q-weighted mean |log K15 - log G7| of each marginal (the larger of the two), i.e. the relative error of the
        marginal densities where they matter."""
        a, b = self.nodes
        lj = self.log_joint(torch.stack(torch.meshgrid(a, b, indexing="ij"), -1))  # (Ma, Mb)
        entropy = []
        for i in range(2):
            f = (lj + self.logw[0][i][:, None] + self.logw[1][i][None, :]).exp()
            entropy.append(-float(torch.where(f > 0, f * lj, torch.zeros_like(f)).sum()))
        marginal_error = 0.0
        for k, rows in ((0, lj), (1, lj.T)):  # rows: this point's nodes x the other point's nodes
            K, G = (lse(rows + self.logw[1 - k][i], -1) for i in range(2))
            weight = (K + self.logw[k][0]).exp()
            marginal_error = max(marginal_error, float((weight * (K - G).abs().nan_to_num(0.0)).sum()))
        mass = float((lj + self.logw[0][0][:, None] + self.logw[1][0][None, :]).exp().sum())
        return {"entropy": entropy[0], "entropy_error": abs(entropy[0] - entropy[1]), "mass": mass,
                "marginal_error": marginal_error}
