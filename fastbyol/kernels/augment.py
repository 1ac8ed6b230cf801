"""The photometric stage of a BYOL view, and the normalisation every loader applies on the device.

photometric_reference is the obviously-right twin: torchvision's tensor ops on one uint8 image, which
round to uint8 after every op. photometric_batched does the same to a whole batch at once, each sample
with its own params, and is tested equal to it; so will be any fused kernel.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F

from fastbyol.views import IMAGENET_MEAN, IMAGENET_STD, ViewParams, ViewSpec

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


# ---- The batched twin ----------------------------------------------------------------------------
# Each op below is torchvision's uint8 op (transforms/v2/functional/_color.py, _misc.py) written for a
# batch with one factor per sample. Every step keeps torchvision's float32 operations in its order, or
# one that provably gives the same bits (noted), and no result depends on which samples share a
# batch, so the uint8 results are bit-identical to photometric_reference.

def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """torchvision's grayscale of uint8 (m, 3, H, W), floored as its uint8 ops floor it: float32
    (m, 1, H, W) holding integers."""
    r, g, b = images.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend, images * ratio + other * (1 - ratio), clamped and truncated to uint8.
    torchvision computes `mul(ratio).add_(other, alpha=1 - ratio)`, whose add is one fused
    multiply-add per element on this CPU build (AVX2); addcmul with a per-sample ratio fuses the same
    way, where a separate multiply and add would round twice (the twin tests catch that)."""
    ratio = _per_sample(ratio)
    return torch.addcmul(images * ratio, other, 1 - ratio).clamp_(0, 255).to(torch.uint8)


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factor)).clamp_(0, 255).to(torch.uint8)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Each mean is a sum of integers below 2**24 (views up to 256 x 256) divided by H * W, so it
    # does not depend on the order in which a batched reduction adds them.
    return _blend(images, _luma(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _luma(images), factor)


# hsv -> rgb: for each hue sector (0..5, and 6 where h * 6 rounds up to 6, i.e. sector 0 again), which
# of (v, p, q, t) each of r, g, b takes (torchvision's table, transposed).
_HSV_SECTORS = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2], [0, 3, 1]])


@functools.cache
def _on_device(name: str, device: torch.device) -> torch.Tensor:
    """Constant tables, copied to a device once: a fresh host-to-device copy per batch would block the
    host until the GPU had finished the previous step."""
    table = dict(hsv_sectors=_HSV_SECTORS,
                 mean=torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                 std=torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))[name]
    return table.to(device)


def _hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue: to float in [0, 1], to HSV, hue shifted modulo 1, back, and to uint8
    by its to_dtype scaling (x 255.999, truncated)."""
    rgb = images.to(torch.float32).mul_(1.0 / 255)
    r, g, b = rgb.unbind(dim=1)
    value = torch.maximum(torch.maximum(r, g), b)  # aminmax over channels, without its slow reduction
    low = torch.minimum(torch.minimum(r, g), b)
    chroma = value - low
    # Where value == low (gray pixels, black included) every numerator below is 0 and torchvision
    # divides by 1: any positive divisor gives the same 0. Elsewhere the divisors are positive
    # normal floats, which clamping at the smallest one leaves alone.
    tiny = torch.finfo(torch.float32).tiny
    saturation = chroma / value.clamp_min(tiny)
    rc, gc, bc = ((value.unsqueeze(1) - rgb) / chroma.clamp_min(tiny).unsqueeze(1)).unbind(dim=1)
    # torchvision adds three masked terms of which exactly one is live: selecting it is the same sum.
    hue = torch.where(value == r, bc - gc, torch.where(value == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    # fmod(x, 1) and remainder(x, 1) as x - floor(x): on the ranges they see here, [5/6, 11/6] and
    # [-0.5, 1.5], subtracting 1 is exact and adding 1 is the very addition remainder performs.
    hue = hue.mul_(1.0 / 6.0).add_(1.0)
    hue = hue.sub_(hue.floor()).add_(shift.view(-1, 1, 1))
    hue = hue.sub_(hue.floor())

    h6 = hue.mul_(6)
    sector = torch.floor(h6)
    fraction = h6.sub_(sector)
    sxf = saturation * fraction
    one_minus_s = 1.0 - saturation
    q = (1.0 - sxf).mul_(value).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(value).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(value).clamp_(0.0, 1.0)
    vpqt = torch.stack((value, p, q, t), dim=1)
    table = _on_device("hsv_sectors", images.device)
    select = table.index_select(0, sector.to(torch.int64).flatten()).view(*sector.shape, 3)
    return vpqt.gather(1, select.permute(0, 3, 1, 2)).mul_(255 + 1.0 - 1e-3).to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    return _luma(images).to(torch.uint8).expand(-1, 3, -1, -1)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's gaussian_blur with a size x size kernel and one sigma per sample: its 2D kernel
    (outer product of softmax-normalised 1D kernels), reflect padding, a depthwise convolution in
    float32, rounded to uint8."""
    m, channels, height, width = images.shape
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    grid = torch.linspace(-lim, lim, steps=size, dtype=torch.float32, device=images.device)
    kernel1d = torch.softmax(grid.div(sigma[:, None]).pow(2).neg(), dim=1)
    kernel2d = kernel1d[:, :, None] * kernel1d[:, None, :]
    weight = kernel2d.repeat_interleave(channels, dim=0).unsqueeze(1)  # (m * 3, 1, size, size)
    padded = nnf.pad(images.to(torch.float32), [size // 2] * 4, mode="reflect")
    out = nnf.conv2d(padded.view(1, m * channels, *padded.shape[2:]), weight, groups=m * channels)
    return out.view(m, channels, height, width).round_().to(torch.uint8)


def _solarize(images: torch.Tensor) -> torch.Tensor:
    # At SOLARIZE_THRESHOLD = 128, x >= 128 exactly where 255 - x < x: solarizing keeps the smaller.
    return torch.minimum(images, images.bitwise_not())


_BATCHED_JITTER = (_brightness, _contrast, _saturation, _hue)  # in views.JITTER_OPS order


def _apply_to(out: torch.Tensor, chosen: torch.Tensor, op, *per_sample: torch.Tensor) -> None:
    """out[s] = op(out[s], *(p[s] for p in per_sample)) for the samples s where `chosen`, in place.
    Rows are picked where `chosen` lives: when the params stay on the CPU, no device sync."""
    rows = chosen.nonzero().squeeze(1)
    if len(rows):
        args = [values[rows].to(out.device, non_blocking=True) for values in per_sample]
        rows = rows.to(out.device, non_blocking=True)
        # index_select: on the CPU, many times faster than out[rows] for a few rows of a batch.
        out[rows] = op(out.index_select(0, rows), *args)


def photometric_batched(images: torch.Tensor, params: ViewParams, spec: ViewSpec) -> torch.Tensor:
    """photometric_reference over a uint8 (N, 3, H, W) batch in batched ops, sample i with
    params.row(i), bit-identical to it. params may stay on the CPU while images are on a GPU.
    Returns a new uint8 (N, 3, H, W) tensor."""
    out = images.clone()
    # Colour jitter in each sample's own order: at each of the four positions, each op runs once,
    # on the samples that have it there.
    for position in range(len(_BATCHED_JITTER)):
        for op, apply in enumerate(_BATCHED_JITTER):
            chosen = params.jitter & (params.order[:, position] == op)
            _apply_to(out, chosen, apply, params.factors[:, op])
    _apply_to(out, params.gray, _grayscale)
    _apply_to(out, params.blur, functools.partial(_gaussian_blur, size=spec.blur_kernel), params.sigma)
    _apply_to(out, params.solarize, _solarize)
    return out


def normalize(batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> (x / 255 - mean) / std as dtype, channels_last, on batch's device.
    Computed in fp32 and cast once, so bf16 output carries a single rounding."""
    mean, std = _on_device("mean", batch.device), _on_device("std", batch.device)
    x = batch.contiguous(memory_format=torch.channels_last).float()
    return ((x / 255 - mean) / std).to(dtype).contiguous(memory_format=torch.channels_last)


def photometric(images: torch.Tensor, params: ViewParams, spec: ViewSpec,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole colour stage of one view for a uint8 (N, 3, S, S) batch, sample i with
    params.row(i): uint8 (N, 3, S, S) when dtype is None, else normalized to dtype, channels_last.
    Every loader calls this one function. For now the torch twin on every device."""
    out = photometric_batched(images, params, spec)
    return out if dtype is None else normalize(out, dtype)
