"""The target network's exponential moving average: xi <- tau * xi + (1 - tau) * theta.

Buffer policy: the target's buffers (BatchNorm running statistics) are COPIED from the online network at
every update. The target always runs in training mode, so they never affect the loss; copying keeps the
target usable for evaluation with the same statistics as the online encoder it averages.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_reference(target: nn.Module, online: nn.Module, tau) -> None:
    """The plain per-tensor loop. tau * xi + (1 - tau) * theta: tau=1 is an exact no-op and tau=0 an
    exact copy (for finite weights)."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(tau).add_(o * (1.0 - tau))
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)


@torch.no_grad()
def ema_foreach(target: nn.Module, online: nn.Module, tau) -> None:
    """Multi-tensor EMA over all parameters, one copy over all buffers. tau may be a 0-d device tensor
    (no recompiles as it moves). Not _foreach_lerp_: it has no tensor-weight overload, so a device tau
    would be read back to the host (.item()) at every step."""
    targets, onlines = list(target.parameters()), list(online.parameters())
    torch._foreach_mul_(targets, tau)
    torch._foreach_add_(targets, torch._foreach_mul(onlines, 1.0 - tau))
    t_bufs, o_bufs = list(target.buffers()), list(online.buffers())
    if t_bufs:
        torch._foreach_copy_(t_bufs, o_bufs)
