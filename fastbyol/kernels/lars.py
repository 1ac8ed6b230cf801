"""LARS with the official BYOL semantics (deepmind-research/byol optimizers.py).

Per parameter w with gradient g, when w is adapted (ndim > 1):
    g <- g + wd * w;  trust = eta * ||w|| / ||g||  (1 where either norm is 0);  g <- trust * g
and for every parameter:
    m <- momentum * m + lr * g;  w <- w - m
Biases and norm parameters (ndim <= 1) get neither weight decay nor the trust ratio.
"""
from __future__ import annotations

import torch


def lars_param_groups(params, weight_decay: float) -> list[dict]:
    """Split by ndim, not by name: ndim <= 1 (biases, BatchNorm) are neither decayed nor adapted."""
    params = [p for p in params if p.requires_grad]
    return [
        dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay, adapt=True),
        dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, adapt=False),
    ]


@torch.no_grad()
def lars_reference(params, grads, bufs, *, lr, weight_decay, momentum, trust_coef, adapt):
    """The plain per-parameter loop: the reference twin of the multi-tensor version."""
    for w, g, m in zip(params, grads, bufs):
        if adapt:
            g = g + weight_decay * w
            w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
            trust = torch.where((w_norm > 0) & (g_norm > 0), trust_coef * w_norm / g_norm,
                                torch.ones_like(w_norm))
            g = g * trust
        m.mul_(momentum).add_(lr * g)
        w.sub_(m)


@torch.no_grad()
def lars_foreach(params, grads, bufs, *, lr, weight_decay, momentum, trust_coef, adapt):
    """Multi-tensor LARS: a handful of fused kernels for the whole list and no host sync (the trust
    ratios stay on the device; torch.where replaces the reference's data-dependent branch). lr may be
    a 0-d device tensor, so a compiled update never recompiles when the schedule moves."""
    if not params:
        return
    if adapt:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
        w_norms = torch.stack(torch._foreach_norm(params))
        g_norms = torch.stack(torch._foreach_norm(grads))
        trust = torch.where((w_norms > 0) & (g_norms > 0), trust_coef * w_norms / g_norms,
                            torch.ones_like(w_norms))
        torch._foreach_mul_(grads, (trust * lr).unbind())
    else:
        grads = torch._foreach_mul(grads, lr)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    torch._foreach_sub_(params, bufs)


class LARS(torch.optim.Optimizer):
    """Build with lars_param_groups(...). The schedule sets group['lr'] (a float, or a 0-d tensor on
    the device) before each step. foreach=True runs lars_foreach, False the reference loop."""

    def __init__(self, param_groups, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 1.5e-6, trust_coef: float = 1e-3, foreach: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coef <= 0:
            raise ValueError(f"bad LARS hyper-parameters: lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} trust_coef={trust_coef}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef,
                        adapt=True)
        super().__init__(param_groups, defaults)
        self.update = lars_foreach if foreach else lars_reference
        # State exists from the start, so a compiled step never meets a lazily growing dict.
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict):
        """Copies into the existing momentum buffers: code holding them (a compiled update) stays valid."""
        buffers = {p: self.state[p]["momentum_buffer"] for g in self.param_groups for p in g["params"]}
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, buf in buffers.items():
                buf.copy_(self.state[p]["momentum_buffer"])
                self.state[p]["momentum_buffer"] = buf

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            self.update(params, [p.grad for p in params],
                        [self.state[p]["momentum_buffer"] for p in params], lr=group["lr"],
                        weight_decay=group["weight_decay"], momentum=group["momentum"],
                        trust_coef=group["trust_coef"], adapt=group["adapt"])
