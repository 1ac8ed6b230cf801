"""The geometry of a BYOL view: crop a box out of a decoded uint8 image, resize it bicubically
(antialiased) to S x S, and flip it; for a whole batch of images of different sizes at once.

crop_and_flip is the obviously-right twin: torchvision's CPU resized_crop + horizontal_flip on one
image. crop_resize does a batch; on the CPU it is crop_and_flip per sample.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode


def crop_and_flip(img: torch.Tensor, box: list[int], flip: bool, size: int) -> torch.Tensor:
    """The geometry of one BYOL view of a uint8 (3, H, W) image: crop `box` (top, left, height,
    width: a ViewParams.crop row), bicubic antialiased resize to size x size, optional horizontal
    flip. Returns uint8 (3, size, size)."""
    view = F.resized_crop(img, *box, size=[size, size], interpolation=InterpolationMode.BICUBIC,
                          antialias=True)
    return F.horizontal_flip(view) if flip else view


class PackedImages(NamedTuple):
    """A batch of decoded uint8 RGB images of different sizes in one flat buffer: image i is
    data[offsets[i]:offsets[i] + 3 * heights[i] * widths[i]] viewed as (3, heights[i], widths[i])."""

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
    return PackedImages(data.to(device), offsets.to(device), sizes[:, 0].to(device), sizes[:, 1].to(device))


def crop_resize(images: PackedImages, crop: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """View geometry for a batch: sample i is crop_and_flip(images.image(i), crop[i], flip[i], size).
    crop: (n, 4) int64 (top, left, height, width), flip: (n,) bool (ViewParams fields).
    Returns uint8 (n, 3, size, size) on the images' device."""
    boxes, flips = crop.tolist(), flip.tolist()
    return torch.stack([crop_and_flip(images.image(i), boxes[i], flips[i], size)
                        for i in range(len(images))])
