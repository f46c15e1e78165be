"""LeanAdam: torch's fused Adam, stepping without the per-step Python of torch.optim.Optimizer.step."""
import torch


class LeanAdam(torch.optim.Adam):
    """torch.optim.Adam(fused=True): the same state, state_dict and kernel (torch._fused_adam_), hence the same
    numbers. Optimizer.step regroups the params by device and dtype and rebuilds its state lists every step (about
    0.4 ms for the dlgm's 40 tensors, a tenth of a step); LeanAdam builds them once, after the first step has
    created the state, and then calls the kernel directly, as torch's _fused_adam does (step count, kernel,
    found_inf rollback). Its per-param step counts are then 0-dim views of one tensor, counted by one add.

    `update()` is that step without the wrapper torch puts around every optimizer's step (a profiler label and the
    step hooks: measured 4-5% of a vae step, with zero_grad's dynamo guard); training loops call it, and
    `step()` (wrapped, hooks run) does the same. `zero_grad(set_to_none=True)` drops the grads in a plain loop.

    Correct when there is one param group of float tensors on one device, every param has a gradient, and the
    options are plain Adam's (no amsgrad, maximize, decoupled weight decay); in any other step it falls back to
    torch's step. `found_inf` (a 0-dim float tensor, set by the caller) skips the update as in torch."""

    def __init__(self, params, lr, betas):
        super().__init__(params, lr=lr, betas=betas, fused=True)
        self._lists = None

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._lists = None  # the state tensors were replaced

    def _cache(self):
        group = self.param_groups[0] if len(self.param_groups) == 1 else None
        if group is None or group["amsgrad"] or group["maximize"] or group.get("decoupled_weight_decay"):
            return None
        params = group["params"]
        state = [self.state.get(p, {}) for p in params]
        if not all("exp_avg" in s for s in state) or len({(p.device, p.dtype) for p in params}) != 1:
            return None
        counts = torch.stack([s["step"] for s in state])  # one tensor; each param's count a view of it
        for i, s in enumerate(state):
            s["step"] = counts[i]
        return (params, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [s["step"] for s in state],
                counts)

    def zero_grad(self, set_to_none: bool = True):
        if self._lists is None or not set_to_none:
            return super().zero_grad(set_to_none)
        for p in self._lists[0]:
            p.grad = None
        return None

    @torch.no_grad()
    def update(self):
        """One Adam step of every param (what step() does, without torch's per-call wrapper)."""
        if self._lists is None:
            super().step()
            self._lists = self._cache()
            return
        params, exp_avgs, exp_avg_sqs, steps, counts = self._lists
        grads = [p.grad for p in params]
        if any(g is None for g in grads):  # torch's step; it counts each param's own view of `counts` in place
            super().step()
            return
        group = self.param_groups[0]
        found_inf = getattr(self, "found_inf", None)
        beta1, beta2 = group["betas"]
        counts.add_(1)
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                           maximize=False, grad_scale=getattr(self, "grad_scale", None), found_inf=found_inf)
        if found_inf is not None:
            counts.sub_(found_inf)

    def step(self, closure=None):
        if closure is not None:
            loss = super().step(closure)
            self._lists = self._cache()
            return loss
        self.update()
        return None


__all__ = ["LeanAdam"]
