"""Crop geometry against torchvision: the one independent call every loader's geometry is held to.

A loader's view i of image `img` with box (top, left, height, width) and flip must equal
    torchvision.transforms.v2.functional.resized_crop(img, top, left, height, width, [S, S],
                                                      BICUBIC, antialias=True)
followed by horizontal_flip when flip, called HERE, not through fastbyol.kernels.crop_resize.

Reuse from a loader's test (tests/test_crop_geometry.py does it for the reference loader):
1. build the loader over `asymmetric_folder(tmp_path)` and turn its colour stage into the identity
   (monkeypatch the photometric function the loader module calls), so that v1/v2 are normalized
   geometry only;
2. recompute each sample's boxes and flips with `fastbyol.views.sample_view_params` in the test;
3. `assert_views_match_torchvision(unnormalize(views.v1), images, params.crop, params.flip, size,
   max_abs=..., max_mean=...)`: 0/0 for the bit-identical CPU twins; a GPU kernel states its own
   tolerances (a few uint8 levels). The helper also checks that the image tells a vertical flip, a
   missing or extra horizontal flip and swapped axes apart at that tolerance, so a loose tolerance
   cannot hide a wrong axis.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from fastbyol.views import IMAGENET_MEAN, IMAGENET_STD

# Non-square sizes (H, W): height and width can never be confused.
ASYMMETRIC_SIZES = [(37, 53), (61, 29), (48, 48), (90, 70)]


def torchvision_view(img: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """The independent call: torchvision's resized_crop (+ horizontal_flip) of a uint8 (3, H, W)."""
    top, left, height, width = (int(v) for v in box)
    view = F.resized_crop(img, top, left, height, width, [size, size],
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.horizontal_flip(view) if flip else view


def asymmetric_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 (3, H, W) with no symmetry: red rises down the rows, green across the columns, blue is a
    bright block in the top-left quarter plus fine noise (texture for the bicubic filter)."""
    rows = torch.linspace(0, 255, height)[:, None].expand(height, width)
    cols = torch.linspace(0, 255, width)[None, :].expand(height, width)
    blue = torch.zeros(height, width)
    blue[:height // 2, :width // 3] = 200
    noise = torch.from_numpy(np.random.default_rng(seed).integers(0, 40, (3, height, width)))
    return (torch.stack([rows, cols, blue]) * 0.8 + noise).round().clamp(0, 255).to(torch.uint8)


def asymmetric_folder(root: Path, per_class: int = 4) -> Path:
    """An ImageFolder (train/a, train/b, val/a, val/b) of lossless PNG asymmetric images of the
    ASYMMETRIC_SIZES, cycling."""
    k = 0
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = ASYMMETRIC_SIZES[k % len(ASYMMETRIC_SIZES)]
                pixels = asymmetric_image(h, w, seed=k).permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
                k += 1
    return root


def unnormalize(views: torch.Tensor) -> torch.Tensor:
    """Normalized views (n, 3, S, S) back to the uint8 scale, as float64 (not rounded)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (views.double() * std + mean) * 255


def _wrong_geometries(img: torch.Tensor, box, flip: bool, size: int) -> dict[str, torch.Tensor]:
    top, left, height, width = (int(v) for v in box)
    expected = torchvision_view(img, box, flip, size)
    wrong = {"vertical flip": F.vertical_flip(expected),
             "horizontal flip inverted": torchvision_view(img, box, not flip, size)}
    rotated = img.transpose(1, 2)  # the image read with its axes swapped, box taken as given
    if top + height <= rotated.shape[1] and left + width <= rotated.shape[2]:
        wrong["swapped axes"] = torchvision_view(rotated, box, flip, size)
    wrong["box read as (left, top, width, height)"] = (
        torchvision_view(img, (left, top, width, height), flip, size)
        if left + width <= img.shape[1] and top + height <= img.shape[2] else None)
    return {k: v for k, v in wrong.items() if v is not None}


def assert_views_match_torchvision(views: torch.Tensor, images, crops, flips, size: int,
                                   max_abs: float = 0.0, max_mean: float = 0.0) -> None:
    """views: (n, 3, S, S) on the uint8 scale (uint8, or float from `unnormalize`), of images[i]
    (uint8 (3, H, W)) under crops[i] (top, left, height, width) and flips[i]. Each must be within
    max_abs (largest |difference|) and max_mean (mean |difference|) of torchvision's view, after
    rounding a float view to the nearest level; and each wrong geometry that changes the picture must
    be farther than that, so the test can tell them apart."""
    assert views.shape == (len(images), 3, size, size), views.shape
    for i, img in enumerate(images):
        box, flip = [int(v) for v in crops[i]], bool(flips[i])
        view = views[i].double().round() if views.is_floating_point() else views[i].double()
        expected = torchvision_view(img, box, flip, size).double()
        diff = (view - expected).abs()
        assert diff.max() <= max_abs and diff.mean() <= max_mean, (
            f"sample {i} (box {box}, flip {flip}): max |diff| {diff.max():.1f} (allowed {max_abs}), "
            f"mean {diff.mean():.3f} (allowed {max_mean})")
        for what, other in _wrong_geometries(img, box, flip, size).items():
            if torch.equal(other, expected.to(other.dtype)):
                continue  # this box and image cannot show that mistake
            off = (other.double() - expected).abs()
            assert off.max() > max_abs or off.mean() > max_mean, (
                f"sample {i}: the image cannot tell '{what}' apart at this tolerance")
