"""The photometric stage of a BYOL view, and the normalisation every loader applies on the device.

photometric_reference is the obviously-right twin: torchvision's tensor ops on one uint8 image, which
round to uint8 after every op. photometric_batched does the same to a whole batch at once, each sample
with its own params, and is tested equal to it. The Triton kernels at the end do the whole stage in
five launches, and are held to stated tolerances against the reference (tests/test_kernels_triton.py).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F

from fastbyol.kernels.triton_launch import host_table, launch, tiling, tl, triton, use_triton
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
                dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    """The whole colour stage of one view for a uint8 (N, 3, S, S) batch, sample i with
    params.row(i): uint8 (N, 3, S, S) when dtype is None, else normalized to dtype, channels_last.
    Every loader calls this one function. The Triton kernels on CUDA tensors, the torch twin
    elsewhere (backend: see fastbyol.kernels.triton_launch.use_triton). params may stay on the CPU."""
    if not use_triton(backend, images.device):
        out = photometric_batched(images, params, spec)
        return out if dtype is None else normalize(out, dtype)
    return _photometric_triton(images, params, spec, dtype)


# ---- The Triton kernels ---------------------------------------------------------------------------
# Five launches per view: the mean gray each contrast op needs (after the ops before it, recomputed),
# the jitter in each sample's order and the grayscale, the blur's row pass, and the blur's column
# pass with solarize and normalize (one launch for the samples that blur, one for the others). Each
# op repeats the twin's float32 operations in its order; the fused multiply-adds torchvision's CPU
# ops perform are written out (in float64, where these operands make them exact), and the compiler
# may fuse nothing else. Per-sample values are (BLOCK_N, 1, 1) arrays: on a GPU one program takes 8
# rows of one sample (triton_launch.tiling); the interpreter, whose cost is per program and op, takes
# whole images of up to 64 samples in one program.

_PARAM_COLUMNS = 14  # jitter, 4 factors, 4 order entries, gray, blur, sigma, solarize, blur slot


def _param_table(params: ViewParams, device: torch.device) -> torch.Tensor:
    """The kernels' per-sample parameters, one float32 row per sample; the last column lists the
    samples that blur first (stable), so that the blur's launches can cover only those."""
    blur_first = torch.argsort((~params.blur).to(torch.uint8), stable=True)
    return host_table([params.jitter, *params.factors.unbind(1), *params.order.unbind(1), params.gray,
                       params.blur, params.sigma, params.solarize, blur_first], torch.float32, device)


@functools.cache
def _blur_grid(size: int, device: torch.device) -> torch.Tensor:
    """torchvision's Gaussian kernel abscissae (linspace over +-(size - 1) / (2 sqrt 2)), float32."""
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    return torch.linspace(-lim, lim, steps=size, dtype=torch.float32).to(device)


def _photometric_triton(images: torch.Tensor, params: ViewParams, spec: ViewSpec,
                        dtype: torch.dtype | None) -> torch.Tensor:
    n, channels, height, width = images.shape
    device = images.device
    if dtype is None:
        out = torch.empty(n, 3, height, width, dtype=torch.uint8, device=device)
    else:
        out = torch.empty(n, 3, height, width, dtype=dtype, device=device,
                          memory_format=torch.channels_last)
    if n == 0:
        return out
    table = _param_table(params, device)
    sums = torch.zeros(n, dtype=torch.int32, device=device)
    colour = torch.empty(n, 3, height, width, dtype=torch.uint8, device=device)
    rows = torch.empty(n, 3, height, width, dtype=torch.float32, device=device)
    grid_points = _blur_grid(spec.blur_kernel, device)
    block_cols = triton.next_power_of_2(width)
    samples, block_rows = tiling(device, n, height)
    grid = (triton.cdiv(n, samples), triton.cdiv(height, block_rows))
    blocks = dict(BLOCK_N=samples, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    for mean_pass, dst in ((True, sums), (False, colour)):
        launch(_jitter_kernel, grid, device, images, dst, table, sums, n, height, width,
               *images.stride(), MEAN_PASS=mean_pass, **blocks)
    # The blur covers the samples that blur; its programs beyond them find nothing to do. Counting
    # them would sync with the device when params live there, so then every slot is launched.
    blurred = int(params.blur.sum()) if params.blur.device.type == "cpu" else n
    blur_grid = (triton.cdiv(blurred, samples), grid[1])
    launch(_blur_rows_kernel, blur_grid, device, colour, rows, table, grid_points, blurred, height,
           width, KSIZE=spec.blur_kernel, **blocks)
    for blur, slots, launch_grid in ((True, blurred, blur_grid), (False, n, grid)):
        if slots:
            launch(_finish_kernel, launch_grid, device, colour, rows, out, table, grid_points, slots,
                   height, width, *out.stride(), *IMAGENET_MEAN, *IMAGENET_STD, KSIZE=spec.blur_kernel,
                   BLUR=blur, NORMALIZE=dtype is not None, **blocks)
    return out


if triton is not None:
    # torchvision's luma weights, as the float32 values its float32 ops use.
    _LUMA_R = tl.constexpr(float(torch.tensor(0.2989)))
    _LUMA_G = tl.constexpr(float(torch.tensor(0.587)))
    _LUMA_B = tl.constexpr(float(torch.tensor(0.114)))
    _TINY = tl.constexpr(torch.finfo(torch.float32).tiny)
    _COLS = tl.constexpr(_PARAM_COLUMNS)

    @triton.jit
    def _fma_tl(a, b, c):
        """a * b + c rounded once to float32, as the CPU's FMA: for these operands (an 8-bit integer
        or a float32 mean times a float32 factor) the float64 product is exact."""
        b = (tl.zeros_like(a) + b).to(tl.float64)  # b may be a float32 constant
        return (a.to(tl.float64) * b + c.to(tl.float64)).to(tl.float32)

    @triton.jit
    def _luma_tl(r, g, b):
        """rgb_to_grayscale on uint8 values: r*0.2989 + g*0.587 + b*0.114 as torchvision's
        mul/add_(alpha) computes it (two FMAs), truncated to an integer."""
        return tl.floor(_fma_tl(b, _LUMA_B, _fma_tl(g, _LUMA_G, r * _LUMA_R)))

    @triton.jit
    def _to_uint8_tl(x):
        """Clamp to [0, 255] and truncate, as torchvision's _blend does."""
        return tl.floor(tl.minimum(tl.maximum(x, 0.0), 255.0))

    @triton.jit
    def _scalar_tl(x):
        """The one value of a (1, 1, 1) array."""
        return tl.max(tl.max(tl.max(x, axis=2), axis=1), axis=0)

    @triton.jit
    def _brightness_tl(r, g, b, factor):
        """adjust_brightness: _blend with black, whose FMA adds an exact zero."""
        return _to_uint8_tl(r * factor), _to_uint8_tl(g * factor), _to_uint8_tl(b * factor)

    @triton.jit
    def _blend_tl(r, g, b, other, ratio):
        """torchvision's _blend on uint8 values: x.mul(ratio).add_(other, alpha=1 - ratio), one FMA."""
        return (_to_uint8_tl(_fma_tl(other, 1.0 - ratio, r * ratio)),
                _to_uint8_tl(_fma_tl(other, 1.0 - ratio, g * ratio)),
                _to_uint8_tl(_fma_tl(other, 1.0 - ratio, b * ratio)))

    @triton.jit
    def _hue_tl(r, g, b, shift):
        """adjust_hue on uint8 values, the twin's _hue operation for operation."""
        r = r * (1.0 / 255)
        g = g * (1.0 / 255)
        b = b * (1.0 / 255)
        value = tl.maximum(tl.maximum(r, g), b)
        low = tl.minimum(tl.minimum(r, g), b)
        chroma = value - low
        saturation = tl.math.div_rn(chroma, tl.maximum(value, _TINY))
        divisor = tl.maximum(chroma, _TINY)
        rc = tl.math.div_rn(value - r, divisor)
        gc = tl.math.div_rn(value - g, divisor)
        bc = tl.math.div_rn(value - b, divisor)
        hue = tl.where(value == r, bc - gc, tl.where(value == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
        hue = hue * (1.0 / 6.0) + 1.0
        hue = (hue - tl.floor(hue)) + shift
        hue = hue - tl.floor(hue)
        h6 = hue * 6.0
        sector = tl.floor(h6)
        fraction = h6 - sector
        sxf = saturation * fraction
        one_minus_s = 1.0 - saturation
        q = tl.minimum(tl.maximum((1.0 - sxf) * value, 0.0), 1.0)
        t = tl.minimum(tl.maximum((sxf + one_minus_s) * value, 0.0), 1.0)
        p = tl.minimum(tl.maximum(one_minus_s * value, 0.0), 1.0)
        k = sector.to(tl.int32)  # 0..6, 6 being sector 0 again
        r = tl.where((k == 0) | (k >= 5), value, tl.where(k == 1, q, tl.where(k == 4, t, p)))
        g = tl.where((k == 1) | (k == 2), value, tl.where(k == 3, q, tl.where((k == 4) | (k == 5), p, t)))
        b = tl.where((k == 3) | (k == 4), value, tl.where(k == 5, q, tl.where(k == 2, t, p)))
        scale = 255 + 1.0 - 1e-3  # to_dtype's float -> uint8 scaling, truncated
        return tl.floor(r * scale), tl.floor(g * scale), tl.floor(b * scale)

    @triton.jit
    def _jitter_kernel(src_ptr, dst_ptr, table_ptr, sums_ptr, n, height, width, s_n, s_c, s_h, s_w,
                       MEAN_PASS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK_COLS: tl.constexpr):
        """Colour jitter in each sample's order, then grayscale, uint8 (n, 3, H, W) -> dst. MEAN_PASS:
        only the ops before contrast, adding each sample's integer gray sum into sums_ptr."""
        sid = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]
        valid = sid < n
        sid = tl.where(valid, sid, 0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[None, :, None]
        cols = tl.arange(0, BLOCK_COLS)[None, None, :]
        live = valid & (rows < height) & (cols < width)
        at = src_ptr + sid * s_n + rows * s_h + cols * s_w
        r = tl.load(at, mask=live, other=0).to(tl.float32)
        g = tl.load(at + s_c, mask=live, other=0).to(tl.float32)
        b = tl.load(at + 2 * s_c, mask=live, other=0).to(tl.float32)
        prm = table_ptr + sid * _COLS
        jitter = tl.load(prm) != 0.0
        bright, contrast, sat, shift = tl.load(prm + 1), tl.load(prm + 2), tl.load(prm + 3), tl.load(prm + 4)
        contrast_at = tl.zeros([BLOCK_N, 1, 1], dtype=tl.int32)
        for p in tl.static_range(4):
            contrast_at += tl.where(tl.load(prm + 5 + p) == 1.0, p, 0)
        mean = tl.math.div_rn(tl.load(sums_ptr + sid).to(tl.float32), (height * width).to(tl.float32))
        for p in tl.static_range(3 if MEAN_PASS else 4):  # contrast is never preceded by 4 ops
            op = tl.load(prm + 5 + p).to(tl.int32)
            on = jitter & (p < contrast_at) if MEAN_PASS else jitter
            if BLOCK_N == 1:  # one sample per program (GPU): a branch runs only its op
                op = _scalar_tl(tl.where(on, op, -1))
                if op == 0:
                    r, g, b = _brightness_tl(r, g, b, bright)
                elif op == 1:
                    r, g, b = _blend_tl(r, g, b, mean, contrast)
                elif op == 2:
                    r, g, b = _blend_tl(r, g, b, _luma_tl(r, g, b), sat)
                elif op == 3:
                    r, g, b = _hue_tl(r, g, b, shift)
            else:  # samples side by side (interpreter): every op, each sample keeps its own
                br, bg, bb = _brightness_tl(r, g, b, bright)
                cr, cg, cb = _blend_tl(r, g, b, mean, contrast)
                sr, sg, sb = _blend_tl(r, g, b, _luma_tl(r, g, b), sat)
                hr, hg, hb = _hue_tl(r, g, b, shift)
                r = tl.where(on & (op == 0), br, tl.where(on & (op == 1), cr, tl.where(
                    on & (op == 2), sr, tl.where(on & (op == 3), hr, r))))
                g = tl.where(on & (op == 0), bg, tl.where(on & (op == 1), cg, tl.where(
                    on & (op == 2), sg, tl.where(on & (op == 3), hg, g))))
                b = tl.where(on & (op == 0), bb, tl.where(on & (op == 1), cb, tl.where(
                    on & (op == 2), sb, tl.where(on & (op == 3), hb, b))))
        gray = _luma_tl(r, g, b)
        if MEAN_PASS:
            part = tl.sum(tl.sum(tl.where(live & jitter, gray, 0.0).to(tl.int32), axis=2), axis=1)
            sid1 = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.atomic_add(dst_ptr + sid1, part, mask=sid1 < n)
        else:
            to_gray = tl.load(prm + 9) != 0.0
            r, g, b = tl.where(to_gray, gray, r), tl.where(to_gray, gray, g), tl.where(to_gray, gray, b)
            at = dst_ptr + sid * 3 * height * width + rows * width + cols
            tl.store(at, r.to(tl.uint8), mask=live)
            tl.store(at + height * width, g.to(tl.uint8), mask=live)
            tl.store(at + 2 * height * width, b.to(tl.uint8), mask=live)

    @triton.jit
    def _blur_weights_tl(grid_ptr, sigma, KSIZE: tl.constexpr):
        """Largest exponent and 1 / sum of torchvision's Gaussian (a softmax over -(x / sigma)^2)."""
        top = tl.full(sigma.shape, -float("inf"), tl.float32)
        for t in tl.static_range(KSIZE):
            x = tl.math.div_rn(tl.load(grid_ptr + t), sigma)
            top = tl.maximum(top, -(x * x))
        total = tl.zeros(sigma.shape, dtype=tl.float32)
        for t in tl.static_range(KSIZE):
            x = tl.math.div_rn(tl.load(grid_ptr + t), sigma)
            total += tl.exp((-(x * x) - top).to(tl.float64)).to(tl.float32)
        return top, tl.math.div_rn(tl.full(sigma.shape, 1.0, tl.float32), total)

    @triton.jit
    def _blur_tap_tl(grid_ptr, sigma, top, inv_total, t):
        x = tl.math.div_rn(tl.load(grid_ptr + t), sigma)
        return tl.exp((-(x * x) - top).to(tl.float64)).to(tl.float32) * inv_total

    @triton.jit
    def _reflect_tl(i, size):
        i = tl.where(i < 0, -i, i)
        return tl.where(i >= size, 2 * (size - 1) - i, i)

    @triton.jit
    def _blur_rows_kernel(src_ptr, dst_ptr, table_ptr, grid_ptr, slots, height, width,
                          KSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                          BLOCK_COLS: tl.constexpr):
        """The blur's row pass for the samples in the first `slots` blur slots: uint8 -> float32,
        reflect padding."""
        slot = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]
        valid = slot < slots
        sid = tl.load(table_ptr + tl.where(valid, slot, 0) * _COLS + 13).to(tl.int64)
        blur = valid & (tl.load(table_ptr + sid * _COLS + 10) != 0.0)
        if tl.max(tl.max(tl.max(blur.to(tl.int32), axis=2), axis=1), axis=0) > 0:
            sigma = tl.load(table_ptr + sid * _COLS + 11)
            top, inv_total = _blur_weights_tl(grid_ptr, sigma, KSIZE)
            rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[None, :, None]
            cols = tl.arange(0, BLOCK_COLS)[None, None, :]
            live = blur & (rows < height) & (cols < width)
            plane = height * width
            base = src_ptr + (sid * 3 * plane + rows * width)  # full-size index math once, not per tap
            acc_r = tl.zeros([BLOCK_N, BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
            acc_g = tl.zeros([BLOCK_N, BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
            acc_b = tl.zeros([BLOCK_N, BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
            for t in tl.static_range(KSIZE):
                w = _blur_tap_tl(grid_ptr, sigma, top, inv_total, t)
                at = base + _reflect_tl(cols + (t - KSIZE // 2), width)
                acc_r += w * tl.load(at, mask=live, other=0).to(tl.float32)
                acc_g += w * tl.load(at + plane, mask=live, other=0).to(tl.float32)
                acc_b += w * tl.load(at + 2 * plane, mask=live, other=0).to(tl.float32)
            at = dst_ptr + sid * 3 * plane + rows * width + cols
            tl.store(at, acc_r, mask=live)
            tl.store(at + plane, acc_g, mask=live)
            tl.store(at + 2 * plane, acc_b, mask=live)

    @triton.jit
    def _round_half_even_tl(x):
        """torch.round on non-negative float32."""
        up = tl.floor(x + 0.5)
        tie_to_odd = ((up - x) == 0.5) & ((up.to(tl.int32) % 2) == 1)
        return tl.where(tie_to_odd, up - 1.0, up)

    @triton.jit
    def _finish_tl(x, solarize, mean, std, out_ptr, o_at, live, NORMALIZE: tl.constexpr):
        """Solarize, then store uint8 or normalized ((x / 255 - mean) / std) in out's dtype."""
        x = tl.where(solarize & (x >= 128.0), 255.0 - x, x)
        if NORMALIZE:
            y = tl.math.div_rn(tl.math.div_rn(x, 255.0) - mean, std)
            tl.store(out_ptr + o_at, y.to(out_ptr.dtype.element_ty), mask=live)
        else:
            tl.store(out_ptr + o_at, x.to(tl.uint8), mask=live)

    @triton.jit
    def _finish_kernel(colour_ptr, rows_ptr, out_ptr, table_ptr, grid_ptr, slots, height, width,
                       o_n, o_c, o_h, o_w, mean_r, mean_g, mean_b, std_r, std_g, std_b,
                       KSIZE: tl.constexpr, BLUR: tl.constexpr, NORMALIZE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """The rest of the stage, written to out: BLUR, for the samples in the first `slots` blur
        slots: the blur's column pass, rounded; else, for the samples that do not blur: the jittered
        image. Then solarize and the output."""
        slot = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]
        valid = slot < slots
        slot = tl.where(valid, slot, 0)
        sid = (tl.load(table_ptr + slot * _COLS + 13) if BLUR else slot).to(tl.int64)
        prm = table_ptr + sid * _COLS
        blur = tl.load(prm + 10) != 0.0
        solarize = tl.load(prm + 12) != 0.0
        rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[None, :, None]
        cols = tl.arange(0, BLOCK_COLS)[None, None, :]
        live = valid & (blur if BLUR else ~blur) & (rows < height) & (cols < width)
        if tl.max(tl.max(tl.max(live.to(tl.int32), axis=2), axis=1), axis=0) > 0:
            plane = height * width
            if BLUR:
                sigma = tl.load(prm + 11)
                top, inv_total = _blur_weights_tl(grid_ptr, sigma, KSIZE)
                base = rows_ptr + (sid * 3 * plane + cols)
                r = tl.zeros([BLOCK_N, BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
                g = tl.zeros([BLOCK_N, BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
                b = tl.zeros([BLOCK_N, BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
                for t in tl.static_range(KSIZE):
                    w = _blur_tap_tl(grid_ptr, sigma, top, inv_total, t)
                    at = base + _reflect_tl(rows + (t - KSIZE // 2), height) * width
                    r += w * tl.load(at, mask=live, other=0.0)
                    g += w * tl.load(at + plane, mask=live, other=0.0)
                    b += w * tl.load(at + 2 * plane, mask=live, other=0.0)
                r, g, b = _round_half_even_tl(r), _round_half_even_tl(g), _round_half_even_tl(b)
            else:
                at = colour_ptr + (sid * 3 * plane + rows * width + cols)
                r = tl.load(at, mask=live, other=0).to(tl.float32)
                g = tl.load(at + plane, mask=live, other=0).to(tl.float32)
                b = tl.load(at + 2 * plane, mask=live, other=0).to(tl.float32)
            o_at = sid * o_n + rows * o_h + cols * o_w
            _finish_tl(r, solarize, mean_r, std_r, out_ptr, o_at, live, NORMALIZE)
            _finish_tl(g, solarize, mean_g, std_g, out_ptr, o_at + o_c, live, NORMALIZE)
            _finish_tl(b, solarize, mean_b, std_b, out_ptr, o_at + 2 * o_c, live, NORMALIZE)
