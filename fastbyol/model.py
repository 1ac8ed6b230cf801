"""Encoders, the projector/predictor MLPs, the BYOL module and its loss (BYOL_RECIPE.md, Networks)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fastbyol import InputError

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                     "wide_resnet50_2", "wide_resnet101_2")
ARCHS = TORCHVISION_ARCHS + ("cnn4",)


def small_stem(model: nn.Module) -> None:
    """The small-image stem (<= 64 px inputs): 3x3 conv, stride 1, no max-pool. Also used on a plain
    torchvision model before it loads an exported backbone trained with this stem."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


class CNN4(nn.Sequential):
    """A 4-conv encoder (32-64-128-256, BN + ReLU, every conv stride 2, global average pool) for CPU
    demos: ResNet-18 trains BYOL at ~32 img/s on 2 cores, this at ~450 (BYOL_RECIPE.md, CPU reference
    point). A stride-1 first conv would cost 4x the FLOPs (measured: 182 vs 665 img/s for the step)."""

    def __init__(self):
        layers, channels = [], (3, 32, 64, 128, 256)
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 256


def build_encoder(arch: str, small: bool) -> tuple[nn.Module, int]:
    """The backbone f with its classifier removed, and the size of its representation y."""
    if arch == "cnn4":
        net = CNN4()
        return net, net.out_dim
    if arch not in TORCHVISION_ARCHS:
        raise InputError(f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if small:
        small_stem(net)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear: the projector g and the predictor q."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) per sample, with the stop-gradient on the target projection z."""
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)


class BYOL(nn.Module):
    """Online network (encoder, projector, predictor), EMA target (encoder, projector) and an online
    linear probe on the detached view-1 representation, trained alongside for monitoring only."""

    def __init__(self, arch: str, small: bool, num_classes: int, proj_hidden: int = 4096,
                 proj_dim: int = 256):
        super().__init__()
        encoder, dim = build_encoder(arch, small)
        self.online = nn.ModuleDict(dict(encoder=encoder, projector=mlp(dim, proj_hidden, proj_dim)))
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        self.probe = nn.Linear(dim, num_classes)

    def train(self, mode: bool = True):
        """The target always runs in training mode (batch statistics), as in the official code."""
        super().train(mode)
        self.target.train(True)
        return self

    def online_parameters(self):
        """Everything the optimizer updates: online network, predictor and probe (not the target)."""
        return [p for name, p in self.named_parameters() if not name.startswith("target.")]

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, labels: torch.Tensor):
        """Returns (total loss, byol loss, probe loss, probe accuracy), all 0-d tensors, no host sync.
        Each view goes through each network in its own call, so BatchNorm statistics are per view,
        as in the official code; the target runs in training mode (batch statistics)."""
        enc, proj = self.online["encoder"], self.online["projector"]
        y1, y2 = enc(v1), enc(v2)
        p1, p2 = self.predictor(proj(y1)), self.predictor(proj(y2))
        with torch.no_grad():
            z1 = self.target["projector"](self.target["encoder"](v1))
            z2 = self.target["projector"](self.target["encoder"](v2))
        byol = (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()
        logits = self.probe(y1.detach())
        probe_loss = F.cross_entropy(logits.float(), labels)
        probe_acc = (logits.argmax(-1) == labels).float().mean()
        return byol + probe_loss, byol.detach(), probe_loss.detach(), probe_acc

    def backbone_state_dict(self, which: str = "online") -> dict:
        """The encoder's weights. For torchvision archs they load into torchvision.models.<arch>()
        (after small_stem when that stem was used); only fc.* is missing."""
        return {k: v.detach().clone() for k, v in getattr(self, which)["encoder"].state_dict().items()}
