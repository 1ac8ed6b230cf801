"""The photometric stage of a BYOL view, and the normalisation every loader applies on the device.

photometric_reference is the obviously-right twin: torchvision's tensor ops on one uint8 image, which
round to uint8 after every op. Faster implementations are tested against it.
"""
from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as F

from fastbyol.pipelines.views import IMAGENET_MEAN, IMAGENET_STD, ViewParams, ViewSpec

# Indexed by ViewParams.order entries, in views.JITTER_OPS order.
_JITTER_FNS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
SOLARIZE_THRESHOLD = 128  # x -> 1 - x where x >= 0.5: on uint8, x >= 127.5, i.e. x >= 128


def photometric_reference(img: torch.Tensor, params: ViewParams, spec: ViewSpec) -> torch.Tensor:
    """Colour jitter (in the sample's order), grayscale, blur, solarize, for one uint8 (3, H, W)
    image; params is one sample's row (ViewParams.row). Returns uint8 (3, H, W)."""
    out = img
    if params.jitter:
        for op in params.order.tolist():
            out = _JITTER_FNS[op](out, params.factors[op].item())
    if params.gray:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    if params.blur:
        sigma = params.sigma.item()
        out = F.gaussian_blur(out, [spec.blur_kernel] * 2, [sigma, sigma])
    if params.solarize:
        out = F.solarize(out, threshold=SOLARIZE_THRESHOLD)
    return out


def photometric_reference_batch(images: torch.Tensor, params: ViewParams, spec: ViewSpec
                                ) -> torch.Tensor:
    """photometric_reference over a uint8 (N, 3, H, W) batch, sample i with params.row(i): the
    reference a batched kernel is tested against."""
    return torch.stack([photometric_reference(img, params.row(i), spec) for i, img in enumerate(images)])


def normalize(batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> (x / 255 - mean) / std as dtype, channels_last, on batch's device.
    Computed in fp32 and cast once, so bf16 output carries a single rounding."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    x = batch.contiguous(memory_format=torch.channels_last).float()
    return ((x / 255 - mean) / std).to(dtype).contiguous(memory_format=torch.channels_last)
