"""The BYOL step: forward + loss compiled as one function, the update (LARS + EMA) as another.

Two functions because a compiled graph cannot contain `.backward()`, and DDP's overlapped gradient
all-reduce splits the forward graph at bucket boundaries anyway. The schedule values (lr, tau) go in as
0-d device tensors, so nothing recompiles as they move, and nothing in a step reads a value back to the
host: the caller reads the returned metrics at log intervals only.
"""
from __future__ import annotations

import torch
from torch import nn

from fastbyol.kernels.ema import ema_foreach, ema_reference
from fastbyol.kernels.lars import LARS
from fastbyol.config import COMPILE_MODES
from fastbyol.model import BYOL
from fastbyol.views import PRECISIONS


class BYOLStep:
    """One optimizer step of BYOL. `net` is what runs the forward: the model itself, or its DDP wrapper
    (checkpoints and the EMA always use the unwrapped `model`).

    fused=True: the multi-tensor EMA, False: its per-parameter twin; LARS runs as the optimizer was built
    (LARS(foreach=...)). Both reference twins make the plain steps of the benchmarks. precision: bf16
    autocast (default on GPUs), fp16 autocast with loss scaling (GPUs without bf16), or fp32; master
    weights are fp32 in every case. compile: off, or a torch.compile mode for the forward+loss and
    for the update; reduce-overhead captures them as CUDA graphs."""

    def __init__(self, model: BYOL, optimizer: LARS, net: nn.Module | None = None, *,
                 precision: str = "fp32", compile: str = "off", fused: bool = True,
                 backend: str | object = "inductor"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile {compile!r}: choose one of {', '.join(COMPILE_MODES)}")
        self.model, self.optimizer = model, optimizer
        self.dtype = PRECISIONS[precision]
        self.device = next(model.parameters()).device
        self.lars = optimizer.update  # multi-tensor or reference, as the optimizer was built
        self.ema = ema_foreach if fused else ema_reference
        # Parameter lists fixed once: the update sees the same structure every step.
        self.groups = [(group, list(group["params"]),
                        [optimizer.state[p]["momentum_buffer"] for p in group["params"]])
                       for group in optimizer.param_groups]
        self.lr = torch.zeros((), device=self.device)
        self.tau = torch.zeros((), device=self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.cudagraphs = compile == "reduce-overhead"
        forward, update = net or model, self._update
        if compile != "off":
            # What the update writes must keep one address for a CUDA graph to capture it (else
            # reduce-overhead skips the graph): the momentum buffers, the weights (reached through
            # self.groups, not as module attributes, so not static by default) and the BN buffers
            # the EMA copies; lr and tau are then read in place at each replay. Each of these
            # tensors lives as long as the step (load_state_dict copies into them).
            for tensor in [self.lr, self.tau, *(b for _, _, bufs in self.groups for b in bufs),
                           *model.parameters(), *model.buffers()]:
                torch._dynamo.mark_static_address(tensor)
            mode = None if compile == "default" else compile
            forward = torch.compile(forward, mode=mode, backend=backend)
            update = torch.compile(update, mode=mode, backend=backend)
        self.forward, self.update = forward, update

    def _update(self, lr: torch.Tensor, tau: torch.Tensor) -> None:
        for group, params, bufs in self.groups:
            self.lars(params, [p.grad for p in params], bufs, lr=lr, weight_decay=group["weight_decay"],
                      momentum=group["momentum"], trust_coef=group["trust_coef"], adapt=group["adapt"])
        self.ema(self.model.target, self.model.online, tau)

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor, labels: torch.Tensor, lr: float,
                 tau: float) -> torch.Tensor:
        """Returns the step's metrics as one device tensor: total loss, BYOL loss, probe loss, probe
        accuracy. Reading it is the caller's host sync, at log intervals."""
        if self.cudagraphs:  # a new iteration: the graphs may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        self.lr.fill_(lr)  # a scalar fill kernel, not a host sync
        self.tau.fill_(tau)
        for group in self.optimizer.param_groups:  # what a saved optimizer state then records
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss, byol, probe_loss, probe_acc = self.forward(v1, v2, labels)
        # None, not zeroed in place. Under DDP with gradient_as_bucket_view the reducer points each
        # p.grad back at its bucket view as the gradient arrives (the views are kept), copying and
        # dividing by the world size in one pass; zeroed views would cost three passes instead (a
        # fill, an in-place add, a separate divide). The update reads p.grad afresh every step.
        for p in self.model.parameters():
            p.grad = None
        if self.scaler is None:
            loss.backward()
            self.update(self.lr, self.tau)
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            # note: fp16 only: the inf check of loss scaling is a host sync (GradScaler's own)
            if not sum(v.item() for v in self.scaler._found_inf_per_device(self.optimizer).values()):
                self.update(self.lr, self.tau)
            self.scaler.update()
        return torch.stack([loss.detach().float(), byol.float(), probe_loss.float(), probe_acc])
