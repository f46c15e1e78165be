"""The change of variables of a flow guide site, eps -> u = T(eps) (BaseNoise): how analysis.exact integrates a flow
in its base noise, where q, as a function of u, is too spiky for any grid."""
import torch


class BaseNoise:
    """The change of variables u = T(eps) of a guide site sampled from a transformed distribution (a flow): eps ~ the
    base distribution, T the composition of its transforms, read from the guide's trace (forward maps and their
    log-Jacobians only, never an inverse).

    Called on eps (..., N) (one scalar per data point, float64) it returns u = T(eps), log q(u|x) = log base(eps) -
    log|dT/deps| and log base(eps), each float64 (..., N); the transforms run in float64 where they accept it. So
    E_q[g(u)] = integral of base(eps) g(T(eps)) d eps: a q that, as a function of u, has spikes narrower than any
    u grid (a spline's steep bins) is a smooth weight in eps. The transforms run on the device of the site's value
    `like` (float64 there, or that value's dtype where they refuse float64); the results are float64 on `home` (the
    device of eps by default)."""

    def __init__(self, fn, site: str, like: torch.Tensor = None, home=None):
        self.site, self.reinterpreted, self.home = site, 0, home
        self.dtype = torch.float32 if like is None else like.dtype  # the transforms' own dtype (the fallback)
        self.device = None if like is None else like.device
        while isinstance(fn, torch.distributions.Independent):
            self.reinterpreted += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        self.fn = fn
        dims = [len(fn.event_shape)]  # event dim at the input of each transform, then at the output
        for t in reversed(fn.transforms):
            dims.insert(0, dims[0] + t.domain.event_dim - t.codomain.event_dim)
        self.dims = dims

    @staticmethod
    def of(guide_trace, site: str, latents, home=None) -> "BaseNoise | None":
        """The BaseNoise of `site` when the guide samples it from a (possibly Independent) TransformedDistribution
        before every other latent in `latents` (so its map depends on x alone), with one scalar per data point;
        else None. Its results are float64 on `home` (None: the device of eps)."""
        names = [n for n in guide_trace.nodes if n in latents]
        if not names or names[0] != site:
            return None
        fn = guide_trace.nodes[site]["fn"]
        while isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        if not isinstance(fn, torch.distributions.TransformedDistribution) or fn.event_shape.numel() != 1:
            return None
        return BaseNoise(guide_trace.nodes[site]["fn"], site, guide_trace.nodes[site]["value"], home)

    def _forward(self, eps, dtype):
        from torch.distributions.utils import _sum_rightmost

        x = eps.to(device=self.device, dtype=dtype)
        base = self.fn.base_dist
        lq = _sum_rightmost(base.log_prob(x), self.dims[0] - len(base.event_shape)).double()
        lbase = lq
        for i, t in enumerate(self.fn.transforms):
            y = t(x)
            lq = lq - _sum_rightmost(t.log_abs_det_jacobian(x, y), self.dims[i] - t.domain.event_dim).double()
            x = y
        if self.reinterpreted:
            lq, lbase = (_sum_rightmost(v, self.reinterpreted) for v in (lq, lbase))
        home = eps.device if self.home is None else self.home
        return tuple(t.to(device=home, dtype=torch.float64) for t in (x, lq, lbase))

    def sample(self, count: int, points: int) -> torch.Tensor:
        """count draws of the base noise per data point: (count, points) float64 on `home` (RNG: the caller's)."""
        draws = self.fn.base_dist.sample((count,)).reshape(count, points)
        return draws.to(device=draws.device if self.home is None else self.home, dtype=torch.float64)

    def __call__(self, eps: torch.Tensor) -> tuple:
        """(u, log q(u|x_k), log base(eps)) for eps (..., N): float64 tensors (..., N)."""
        e = eps[..., None]  # the site's event dim
        with torch.no_grad():
            try:
                u, lq, lbase = self._forward(e, torch.float64)
            except (RuntimeError, TypeError):  # a transform with float32 parameters that refuses float64 input
                u, lq, lbase = self._forward(e, self.dtype)
        return u.reshape(eps.shape), lq.reshape(eps.shape), lbase.reshape(eps.shape)
