"""The geometry of a BYOL view: crop a box out of a decoded uint8 image, resize it bicubically
(antialiased) to S x S, and flip it; for a whole batch of images of different sizes at once.

crop_and_flip is the obviously-right twin: torchvision's CPU resized_crop + horizontal_flip on one
image. crop_resize does a batch: on CUDA tensors with the Triton kernel below, elsewhere with the twin
per sample (backend="triton" runs the kernel on CPU tensors through Triton's interpreter, for tests).

The kernel repeats torchvision's CPU arithmetic (torch's uint8 antialiased bicubic,
aten/src/ATen/native/cpu/UpSampleKernel.cpp): per axis, PIL's Keys cubic (a = -0.5) weights in
float64, normalised, rounded to int16 at the largest precision that keeps the axis's largest weight
below 2**15; then two separable integer passes, width first, each an int32 dot product plus half an
LSB, shifted down and clamped to uint8. Integer passes have no rounding order to disagree on, so the
kernel differs from the twin only where a float64 weight lands within ~1e-12 of an int16 rounding
boundary (FMA placement in the weight formula).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from fastbyol.kernels.triton_launch import host_table, launch, tiling, tl, triton, use_triton


def crop_and_flip(img: torch.Tensor, box: list[int], flip: bool, size: int) -> torch.Tensor:
    """The geometry of one BYOL view of a uint8 (3, H, W) image: crop `box` (top, left, height,
    width: a ViewParams.crop row), bicubic antialiased resize to size x size, optional horizontal
    flip. Returns uint8 (3, size, size)."""
    view = F.resized_crop(img, *box, size=[size, size], interpolation=InterpolationMode.BICUBIC,
                          antialias=True)
    return F.horizontal_flip(view) if flip else view


class PackedImages(NamedTuple):
    """A batch of decoded uint8 RGB images of different sizes in one flat buffer: image i is
    data[offsets[i]:offsets[i] + 3 * heights[i] * widths[i]] viewed as (3, heights[i], widths[i]).
    A subset of a resident set is PackedImages(data, offsets[idx], heights[idx], widths[idx]): the
    buffer is shared, only the three index tensors are gathered."""

    data: torch.Tensor      # (total,) uint8
    offsets: torch.Tensor   # (n,) int64
    heights: torch.Tensor   # (n,) int64
    widths: torch.Tensor    # (n,) int64

    def __len__(self) -> int:
        return len(self.offsets)

    def image(self, i: int) -> torch.Tensor:
        """Image i as uint8 (3, H, W), a view of the buffer."""
        h, w, start = int(self.heights[i]), int(self.widths[i]), int(self.offsets[i])
        return self.data[start:start + 3 * h * w].view(3, h, w)


def pack_images(images: Sequence[torch.Tensor], device: torch.device | str | None = None
                ) -> PackedImages:
    """Pack uint8 (3, H, W) images into one flat buffer (on `device`, default: where they are)."""
    sizes = torch.tensor([img.shape[-2:] for img in images], dtype=torch.int64).view(-1, 2)
    numel = 3 * sizes[:, 0] * sizes[:, 1]
    offsets = torch.cumsum(numel, 0) - numel
    data = torch.cat([img.reshape(-1) for img in images]) if len(images) else torch.zeros(0, dtype=torch.uint8)
    device = device or data.device
    heights, widths = sizes.T.contiguous()
    return PackedImages(data.to(device), offsets.to(device), heights.to(device), widths.to(device))


def crop_resize(images: PackedImages, crop: torch.Tensor, flip: torch.Tensor, size: int, *,
                backend: str | None = None, max_height: int | None = None) -> torch.Tensor:
    """View geometry for a batch: sample i is crop_and_flip(images.image(i), crop[i], flip[i], size).
    crop: (n, 4) int64 (top, left, height, width), flip: (n,) bool (ViewParams fields), on the CPU
    (as the sampler gives them: no host sync) or on the images' device (then one sync, to size the
    scratch buffer, unless the caller gives max_height = the largest crop height, known on the host
    before the copy). Returns uint8 (n, 3, size, size) on the images' device; backend: see use_triton."""
    device = images.data.device
    if not use_triton(backend, device):
        boxes, flips = crop.tolist(), flip.tolist()
        return torch.stack([crop_and_flip(images.image(i), boxes[i], flips[i], size)
                            for i in range(len(images))])
    n = len(images)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
    if n == 0:
        return out
    if max_height is None:  # note: a CPU-GPU sync point when crop lives on the GPU
        max_height = int(crop[:, 2].max())
    boxes = host_table([*crop.unbind(1), flip], torch.int32, device)
    # The width pass's output: each crop's rows at the final width.
    rows = torch.empty(n, 3, max_height, size, dtype=torch.uint8, device=device)
    block = triton.next_power_of_2(size)
    samples, tile_rows = tiling(device, n, max_height)
    tile_out = tiling(device, n, size)[1]
    index = [t.contiguous() for t in (images.offsets, images.heights, images.widths)]
    for horizontal, src, dst, tile, extent in ((True, images.data, rows, tile_rows, max_height),
                                               (False, rows, out, tile_out, size)):
        launch(_resample_kernel, (triton.cdiv(n, samples), triton.cdiv(extent, tile)), device,
               src, dst, boxes, *index, n, size, max_height, HORIZONTAL=horizontal,
               BLOCK_N=samples, BLOCK_ROWS=tile, BLOCK_COLS=block, BLOCK_SIZE=block)
    return out


if triton is not None:
    @triton.jit
    def _keys_cubic(x):
        """PIL's antialiasing bicubic filter (Keys, a = -0.5) in float64, as torch writes it."""
        ax = tl.abs(x)
        inner = ((1.5 * ax - 2.5) * ax) * ax + 1.0
        outer = ((-0.5 * ax + 2.5) * ax - 4.0) * ax + 2.0
        return tl.where(ax < 1.0, inner, tl.where(ax < 2.0, outer, 0.0))

    @triton.jit
    def _resample_kernel(src_ptr, dst_ptr, boxes_ptr, offsets_ptr, heights_ptr, widths_ptr, n, size,
                         scratch_rows, HORIZONTAL: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """One separable pass of the antialiased bicubic resize, for a tile of BLOCK_N samples (all
        three channels). HORIZONTAL: crop rows of the packed images -> rows of width `size` in the
        scratch buffer; else: scratch columns -> `size` output rows, flipped where a sample says so.
        Arrays are (sample, row, column); per-sample values are (BLOCK_N, 1, 1)."""
        sid = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None, None]
        valid = sid < n
        sid = tl.where(valid, sid, 0).to(tl.int64)
        top = tl.load(boxes_ptr + sid * 5 + 0)
        left = tl.load(boxes_ptr + sid * 5 + 1)
        box_h = tl.load(boxes_ptr + sid * 5 + 2)
        box_w = tl.load(boxes_ptr + sid * 5 + 3)
        flip = tl.load(boxes_ptr + sid * 5 + 4)
        rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[None, :, None]
        cols = tl.arange(0, BLOCK_COLS)[None, None, :]
        if HORIZONTAL:
            in_size, out_idx, other, other_count = box_w, cols, rows, box_h
            img_w = tl.load(widths_ptr + sid)
            src = src_ptr + tl.load(offsets_ptr + sid) + top.to(tl.int64) * img_w + left
            src_axis, src_other, src_chan = 1, img_w, tl.load(heights_ptr + sid) * img_w
            dst = dst_ptr + sid * 3 * scratch_rows * size
            dst_idx = rows * size + cols
            dst_chan = scratch_rows * size
        else:
            in_size, out_idx, other, other_count = box_h, rows, cols, size
            src = src_ptr + sid * 3 * scratch_rows * size
            src_axis, src_other, src_chan = size, 1, scratch_rows * size
            dst = dst_ptr + sid * 3 * size * size
            dst_idx = rows * size + tl.where(flip != 0, size - 1 - cols, cols)
            dst_chan = size * size
        # The axis (area_pixel_compute_scale, align_corners=False): scale, support, most taps.
        scale = in_size.to(tl.float64) / size
        support = tl.where(scale >= 1.0, 2.0 * scale, 2.0)
        invscale = tl.where(scale >= 1.0, 1.0 / scale, 1.0)
        kmax = tl.ceil(support).to(tl.int32) * 2 + 1
        taps = tl.max(tl.where(valid, kmax, 0))
        # Precision: from the largest normalised weight over every output of the axis.
        every = tl.arange(0, BLOCK_SIZE)[None, None, :]
        center = scale * (every.to(tl.float64) + 0.5)
        first = tl.maximum((center - support + 0.5).to(tl.int32), 0)
        count = tl.minimum((center + support + 0.5).to(tl.int32), in_size) - first
        count = tl.minimum(tl.maximum(count, 0), kmax)
        total = tl.zeros([BLOCK_N, 1, BLOCK_SIZE], dtype=tl.float64)
        for j in range(0, taps):
            w = _keys_cubic(((first + j).to(tl.float64) - center + 0.5) * invscale)
            total += tl.where(j < count, w, 0.0)
        largest = tl.zeros([BLOCK_N, 1, BLOCK_SIZE], dtype=tl.float64)
        for j in range(0, taps):
            w = _keys_cubic(((first + j).to(tl.float64) - center + 0.5) * invscale)
            w = tl.where(total != 0.0, w / tl.where(total != 0.0, total, 1.0), w)
            largest = tl.maximum(largest, tl.where((j < count) & (every < size), w, 0.0))
        wt_max = tl.max(largest, axis=2, keep_dims=True)
        precision = tl.full([BLOCK_N, 1, 1], 22, tl.int32)
        for p in tl.static_range(21, -1, -1):
            precision = tl.where((0.5 + wt_max * (2 << p)).to(tl.int32) >= 32768, p, precision)
        one = (1 << precision).to(tl.float64)
        # This tile's outputs and their taps (_compute_indices_min_size_weights_aa).
        center = scale * (out_idx.to(tl.float64) + 0.5)
        first = tl.maximum((center - support + 0.5).to(tl.int32), 0)
        count = tl.minimum((center + support + 0.5).to(tl.int32), in_size) - first
        count = tl.minimum(tl.maximum(count, 0), kmax)
        total = tl.zeros_like(center)
        for j in range(0, taps):
            w = _keys_cubic(((first + j).to(tl.float64) - center + 0.5) * invscale)
            total += tl.where(j < count, w, 0.0)
        live = valid & (out_idx < size) & (other < other_count)
        acc_r = tl.zeros([BLOCK_N, BLOCK_ROWS, BLOCK_COLS], dtype=tl.int32)
        acc_g = tl.zeros([BLOCK_N, BLOCK_ROWS, BLOCK_COLS], dtype=tl.int32)
        acc_b = tl.zeros([BLOCK_N, BLOCK_ROWS, BLOCK_COLS], dtype=tl.int32)
        for j in range(0, taps):
            w = _keys_cubic(((first + j).to(tl.float64) - center + 0.5) * invscale)
            w = tl.where(total != 0.0, w / tl.where(total != 0.0, total, 1.0), w) * one
            w = tl.where(w < 0.0, (w - 0.5).to(tl.int32), (w + 0.5).to(tl.int32))
            take = live & (j < count)
            at = src + (first + j) * src_axis + other * src_other
            acc_r += tl.load(at, mask=take, other=0).to(tl.int32) * w
            acc_g += tl.load(at + src_chan, mask=take, other=0).to(tl.int32) * w
            acc_b += tl.load(at + 2 * src_chan, mask=take, other=0).to(tl.int32) * w
        half = 1 << (precision - 1)
        out_r = tl.minimum(tl.maximum((acc_r + half) >> precision, 0), 255).to(tl.uint8)
        out_g = tl.minimum(tl.maximum((acc_g + half) >> precision, 0), 255).to(tl.uint8)
        out_b = tl.minimum(tl.maximum((acc_b + half) >> precision, 0), 255).to(tl.uint8)
        tl.store(dst + dst_idx, out_r, mask=live)
        tl.store(dst + dst_chan + dst_idx, out_g, mask=live)
        tl.store(dst + 2 * dst_chan + dst_idx, out_b, mask=live)
