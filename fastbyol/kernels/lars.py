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
        m.mul_(momentum).add_(g, alpha=lr)
        w.sub_(m)


class LARS(torch.optim.Optimizer):
    """Build with lars_param_groups(...). The schedule sets group['lr'] before each step."""

    def __init__(self, param_groups, lr: float = 0.2, momentum: float = 0.9,
                 weight_decay: float = 1.5e-6, trust_coef: float = 1e-3):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coef <= 0:
            raise ValueError(f"bad LARS hyper-parameters: lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} trust_coef={trust_coef}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef,
                        adapt=True)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            lars_reference(params, [p.grad for p in params], bufs, lr=group["lr"],
                           weight_decay=group["weight_decay"], momentum=group["momentum"],
                           trust_coef=group["trust_coef"], adapt=group["adapt"])
