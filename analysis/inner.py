"""The inner integrals over v at given u values (one per row and data point), by adaptive Gauss-Kronrod panels.

Inner starts from the panels seeded at the features of the integrands (analysis.seeding), each cut into 2**level
equal parts, and splits, per row, the panels with the largest G7/K15 difference until the relative error is below
INNER_TOL * 10**-level or stalls (the float32 noise floor of the model's outputs); the refinement of
analysis.quadrature.refine measures what is left. The cut is what makes that measurement see the inner error: a row
whose seeded panels already met the tolerance would otherwise keep the same panels, and the same error, at every
level (on the command line's dlgm networks exact() then reported 1.4e-7 and was 2.4e-7 off).
Each row's integrands are exp(log-density - shift) with a per-row shift, raised by a split that finds a peak RESHIFT
nats above it (the row's earlier estimates are rescaled), so exp never overflows. Direct is the 'inner integral'
of a one-latent model: the densities at u themselves.
"""
import math

import torch

from .densities import Densities
from .quadrature import GAUSS7_W, KRONROD_W, KRONROD_X
from .seeding import FeatureSeeding

INNER_TOL = 1e-4  # relative error target of each inner integral (times 10**-level)
RESHIFT = 300.0  # nats: a split panel's peak this far above its row's shift raises the shift (exp overflows at 709)
LIVE_GROUP = 4  # rows are evaluated in groups by their count of live panels, rounded up to a multiple of this
STALL_ROUNDS = 3  # inner rounds without the error halving after which a row stops splitting
ROWS = 64  # rows per block: the dlgm's evaluation at n = 1000 took 6.9-7.3 s with 64, 8.0-8.1 s with 256 (whose
#            float64 node tensors outgrow the cache), the same numbers to 1e-13 (2026-12-02)


def _split(a, b, pieces: int) -> tuple:
    """Panels [a, b] (..., P) each cut into `pieces` equal parts: (..., P * pieces)."""
    if pieces == 1:
        return a, b
    edges = a[..., None] + (b - a)[..., None] * torch.linspace(0, 1, pieces + 1, dtype=a.dtype)
    return edges[..., :-1].flatten(-2), edges[..., 1:].flatten(-2)


class Inner(FeatureSeeding):
    """The inner integral over v at given u values (one per row and data point), by adaptive Gauss-Kronrod panels
    seeded at the features of the integrands; `parts` selects the densities integrated: q, p or both."""

    def __call__(self, u, level: int = 0, rows: int = ROWS) -> dict:
        """For rows u (A, 2): 'lq' = log of the integral of q(u, v|x) over v, 'lp' = log of that of p(x, u, v),
        'mean' = {site key: E_q(v|u)[log-density]} (the conditional means under the guide) and 'at' = each site's
        log-density at one v node (for terms that do not depend on v). Rows are processed in blocks."""
        parts = [self._block(u[s:s + rows], level) for s in range(0, u.shape[0], rows)]

        def cat(key):
            return torch.cat([p[key] for p in parts])

        out = {k: cat(k) for k in parts[0] if k not in ("mean", "at")}
        for k in ("mean", "at"):
            out[k] = {name: torch.cat([p[k][name] for p in parts]) for name in parts[0][k]}
        return out

    def _panels(self, u, a, b):
        """Kronrod and Gauss estimates, per panel (A, 2, P), of the q mass, of q times each site log-density and
        of the p mass, relative to the per-row shifts self.shift (set at the first call; raised where these panels
        peak more than RESHIFT nats above it, and _block then rescales the row's earlier estimates)."""
        half = (b - a) / 2
        nodes = (a + b)[..., None] / 2 + half[..., None] * KRONROD_X  # (A, 2, P, 15)
        logs = self._live_logs(u, nodes, b > a)
        joint = self._joint(logs)
        if self.shift is None:
            self.shift = {J: joint[J].amax((2, 3)).nan_to_num(0.0, neginf=0.0) for J in joint}
            self.at = {k: v[:, :, 0, 7] for k, v in logs.items()}
        else:  # a split found a peak far above the first panels' (exp would overflow): raise that row's shift
            peaks = {J: joint[J].amax((2, 3)) for J in joint}
            self.shift = {J: torch.where(peaks[J].nan_to_num(-math.inf) > self.shift[J] + RESHIFT, peaks[J],
                                         self.shift[J]) for J in joint}
        f = {}
        for J, val in joint.items():
            f[J] = torch.nan_to_num((val - self.shift[J][..., None, None]).exp())
        if "q" in f:
            for k, val in logs.items():
                f["qh:" + k] = torch.where(f["q"] > 0, f["q"] * val, torch.zeros_like(val))
        return {k: ((half[..., None] * KRONROD_W * v).sum(-1), (half[..., None] * GAUSS7_W * v).sum(-1))
                for k, v in f.items()}

    def _live_logs(self, u, nodes, live):
        """The site log-densities (A, 2, P, 15) at the nodes (A, 2, P, 15) of the panels, evaluated only up to each
        row's last live panel (rows grouped by that count, rounded up to LIVE_GROUP panels); the nodes of the
        panels beyond it get -inf. Those panels have zero width (the padding of rows with fewer features than
        the fullest row of their block, or with fewer than the other data point), so they weigh nothing either
        way: each row's estimates are the same as when every node is evaluated."""
        A, _, P, K = nodes.shape
        last = (live * torch.arange(1, P + 1)).amax(-1).amax(-1)  # (A,): 1 + the last live panel of either point
        reach = ((last + LIVE_GROUP - 1) // LIVE_GROUP * LIVE_GROUP).clamp(1, P)
        out = {}
        for r in reach.unique().tolist():
            rows = (reach == r).nonzero().squeeze(-1)
            part = self._eval(u[rows], nodes[rows, :, :r].permute(0, 2, 3, 1).reshape(len(rows), r * K, 2))
            for k, v in part.items():
                if k not in out:
                    out[k] = torch.full((A, P, K, 2), -math.inf, dtype=v.dtype, device=v.device)
                out[k][rows, :r] = v.reshape(len(rows), r, K, 2)
        return {k: v.permute(0, 3, 1, 2) for k, v in out.items()}

    def _row_errors(self, est):
        """Per panel (A, 2, P), the largest |K15 - G7| among the row's integrals, relative to the row's size."""
        errs = []
        if "q" in est:
            zq = est["q"][0].sum(-1, keepdim=True).clamp_min(1e-300)
            errs.append((est["q"][0] - est["q"][1]).abs() / zq)
            for k, (K, G) in est.items():
                if k.startswith("qh:"):
                    scale = zq * (K.sum(-1, keepdim=True) / zq).abs().clamp_min(1.0)
                    errs.append((K - G).abs() / scale)
        if "p" in est:
            errs.append((est["p"][0] - est["p"][1]).abs() / est["p"][0].sum(-1, keepdim=True).clamp_min(1e-300))
        return torch.stack(errs).amax(0)

    def _block(self, u, level, splits=8, rounds=16):
        """Adaptive inner integration for one block of rows: start from the feature panels (each cut into 2**level
        equal parts), then, for up to `rounds`,
        split the worst panels (as many as the neediest row needs, at most `splits`) of every row whose relative error
        sum exceeds INNER_TOL * 10**-level, until it does not or its error stalls (STALL_ROUNDS: the float32 noise
        floor of the model's outputs; analysis.quadrature.refine measures what is left)."""
        tol = INNER_TOL * 10.0 ** (-level)
        a, b = _split(*self.features(u), 2 ** level)
        self.shift = None
        est = self._panels(u, a, b)
        history = []  # per round, each row's error relative to tol (the worse data point)
        for _ in range(rounds):
            err = self._row_errors(est)
            err = torch.where(b - a > 1e-12 * (self.hi - self.lo), err, torch.zeros_like(err))
            ratio = (err.sum(-1) / tol).amax(-1)
            history.append(ratio)
            busy = ratio > 1  # rows (A,)
            if len(history) > STALL_ROUNDS:  # a row whose error has not halved in STALL_ROUNDS rounds of splits sits
                #                              on its noise floor (float32 model outputs): more splits do not help
                busy &= ratio <= 0.5 * history[-1 - STALL_ROUNDS]
            if not bool(busy.any()):
                break
            rows = busy.nonzero().squeeze(-1)
            # split as many panels as the neediest row needs (at most `splits`): per row and data point, the worst
            # panels until the error left in the others is below tol / 2 (every row evaluates S panels)
            worst = err[rows].sort(-1, descending=True).values
            left = err[rows].sum(-1, keepdim=True) - worst.cumsum(-1)
            need = int((left >= tol / 2).sum(-1).amax()) + 1
            pick = err[rows].topk(min(splits, need, err.shape[-1]), dim=-1).indices  # (R, 2, S)
            ra, rb = a[rows].gather(-1, pick), b[rows].gather(-1, pick)
            mid = (ra + rb) / 2
            na, nb = torch.cat([ra, mid], -1), torch.cat([mid, rb], -1)  # (R, 2, 2S)
            shift = self.shift
            self.shift = {J: v[rows] for J, v in shift.items()}
            new = self._panels(u[rows], na, nb)
            for J in shift:  # rescale the rows' earlier estimates where _panels raised their shift
                factor = (shift[J][rows] - self.shift[J]).exp()  # (R, 2), 1 where unchanged
                for k in est:
                    if k == J or (J == "q" and k.startswith("qh:")):
                        est[k] = tuple(torch.index_put(e, (rows,), e[rows] * factor[..., None]) for e in est[k])
                shift[J] = torch.index_put(shift[J], (rows,), self.shift[J])
            self.shift = shift
            # the picked panels are replaced by their left halves; the right halves are appended (other rows pad)
            S = pick.shape[-1]
            a[rows] = a[rows].scatter(-1, pick, na[..., :S])
            b[rows] = b[rows].scatter(-1, pick, nb[..., :S])
            pad = torch.full(a.shape[:2] + (S,), self.lo, dtype=torch.float64)
            ea, eb = pad.clone(), pad.clone()
            ea[rows], eb[rows] = na[..., S:], nb[..., S:]
            a, b = torch.cat([a, ea], -1), torch.cat([b, eb], -1)
            for k, (K, G) in est.items():
                out = []
                for old, fresh in ((K, new[k][0]), (G, new[k][1])):
                    old = old.clone()
                    old[rows] = old[rows].scatter(-1, pick, fresh[..., :S])
                    extra = torch.zeros(old.shape[:2] + (S,), dtype=torch.float64)
                    extra[rows] = fresh[..., S:]
                    out.append(torch.cat([old, extra], -1))
                est[k] = tuple(out)
        total = {k: K.sum(-1) for k, (K, G) in est.items()}
        out = {"mean": {}, "at": self.at}
        if "q" in total:
            out["lq"] = total["q"].log() + self.shift["q"]
            for k in self.at:
                out["mean"][k] = total["qh:" + k] / total["q"].clamp_min(1e-300)
        if "p" in total:
            out["lp"] = total["p"].log() + self.shift["p"]
        return out


class Direct:
    """The 'inner integral' of a one-latent model: the densities at u themselves."""

    def __init__(self, dens: Densities, outer: str, parts=("q", "p")):
        self.d, self.outer, self.parts = dens, outer, parts

    def __call__(self, u, level: int = 0) -> dict:
        """Like Inner.__call__ for rows u (A, 2): 'lq', 'lp', and the site log-densities as 'mean' and 'at'."""
        step = self.d.rows(2)
        pieces = [self.d.logs({self.outer: u[s:s + step]}, self.parts) for s in range(0, u.shape[0], step)]
        logs = {k: torch.cat([p[k].expand(min(step, u.shape[0] - i * step), 2) for i, p in enumerate(pieces)])
                for k in pieces[0]}
        out = {"mean": logs, "at": logs}
        if "q" in self.parts:
            out["lq"] = sum(v for k, v in logs.items() if k.startswith("q:"))
        if "p" in self.parts:
            out["lp"] = sum(v for k, v in logs.items() if k.startswith("p:"))
        return out
