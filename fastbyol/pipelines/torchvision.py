"""The reference loader: PIL decode with EXIF orientation, torchvision ops on uint8 tensors, a torch
DataLoader. Slow and obviously right: the baseline that faster pipelines are measured and tested against.

Workers return uint8 views; normalisation happens in the main process, on the device (`normalize`).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from fastbyol import InputError
from fastbyol.kernels.augment import normalize, photometric_reference
from fastbyol.pipelines.views import (ViewParams, ViewSpec, Views, byol_view_specs, epoch_batches,
                                      fixed_subset, sample_generator, sample_view_params)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


# ---- Folder scanning ----------------------------------------------------------------------------

def split_folder(root: str | os.PathLike, split: str) -> Path:
    """root/<split> in the train/ + val/ layout; root itself for split 'train' when root holds the
    class folders directly."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    if (root / "train").is_dir() or (root / "val").is_dir():
        folder = root / split
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder (the {split!r} split)")
        return folder
    if split != "train":
        raise InputError(f"{root}: no {split}/ folder (a folder of class folders is a train split only)")
    return root


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _images_under(folder: Path) -> list[str]:
    """Image files below folder, recursively and sorted, as torchvision's make_dataset walks."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not _is_hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def scan_image_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of an ImageFolder split: classes sorted by name as torchvision sorts them,
    samples as (path, label). A class folder without images keeps its label, with a warning."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _is_hidden(e.name))
    if not classes:
        raise InputError(f"{folder}: no class folders (expected {folder}/<class>/<image files>)")
    samples = []
    for label, name in enumerate(classes):
        paths = _images_under(folder / name)
        if not paths:
            log.warning("%s: class folder has no images (its label %d is kept)", folder / name, label)
        samples += [(path, label) for path in paths]
    if not samples:
        raise InputError(f"{folder}: no image files ({' '.join(sorted(IMAGE_EXTENSIONS))}) "
                         "in any class folder")
    return classes, samples


def native_size(root: str | os.PathLike, split: str = "train", probe: int = 16) -> int:
    """The largest side among the first `probe` images that open (headers only), from which the
    trainer decides small-image mode (<= 64 px)."""
    _, samples = scan_image_folder(split_folder(root, split))
    sides = []
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                sides.append(max(img.size))
        except Exception:  # a bad file says nothing about the size; the loaders report it
            continue
        if len(sides) == probe:
            break
    if not sides:
        raise InputError(f"{root}: none of the {split} images can be opened")
    return max(sides)


# ---- Decoding -----------------------------------------------------------------------------------

def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        # PIL's 16-bit -> 8-bit conversion clips at 255 instead of scaling: keep the high byte.
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
    return img.convert("RGB")


def decode_image(path: str) -> torch.Tensor:
    """The upright RGB image as uint8 (3, H, W). Raises whatever PIL raises on a bad file, truncated
    JPEGs included (ImageFile.LOAD_TRUNCATED_IMAGES stays off: a truncated file is reported, not
    silently padded with gray)."""
    with Image.open(path) as img:
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


BadFile = tuple[str, str]  # (path, reason)


def decode_or_substitute(samples: list[tuple[str, int]], index: int
                         ) -> tuple[torch.Tensor, int, int, list[BadFile]]:
    """Decode samples[index]; if it is bad, the next index (cyclically) that decodes stands in for it,
    so a batch keeps its size. Returns (image, label, index actually decoded, bad files met)."""
    bad = []
    for offset in range(len(samples)):
        used = (index + offset) % len(samples)
        path, label = samples[used]
        try:
            return decode_image(path), label, used, bad
        # Deliberately broad: on damaged input PIL raises OSError, ValueError, SyntaxError,
        # struct.error, ... and any of them means "this file is bad", never "stop training".
        except Exception as err:
            bad.append((path, f"{type(err).__name__}: {err}"))
    raise InputError(f"{os.path.dirname(samples[0][0])}: no image in this split decodes "
                     f"(first error: {bad[0][1]})")


# ---- Views --------------------------------------------------------------------------------------

def reference_view(img: torch.Tensor, params: ViewParams, spec: ViewSpec) -> torch.Tensor:
    """One BYOL view of a uint8 (3, H, W) image from one sample's params: crop + bicubic resize,
    flip, then the photometric stage. Returns uint8 (3, spec.size, spec.size)."""
    top, left, height, width = params.crop.tolist()
    view = F.resized_crop(img, top, left, height, width, size=[spec.size, spec.size],
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
    if params.flip:
        view = F.horizontal_flip(view)
    return photometric_reference(view, params, spec)


class _TrainViews(Dataset):
    """Item i of one epoch: both views of one decoded image, with params keyed by
    (seed, epoch, index, view). A substituted sample is exactly what its stand-in index yields."""

    def __init__(self, samples: list[tuple[str, int]], specs: tuple[ViewSpec, ViewSpec], seed: int,
                 epoch: int):
        self.samples, self.specs, self.seed, self.epoch = samples, specs, seed, epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        img, label, used, bad = decode_or_substitute(self.samples, index)
        height, width = (torch.tensor([side]) for side in img.shape[-2:])
        views = []
        for view, spec in enumerate(self.specs):
            gen = sample_generator(self.seed, self.epoch, used, view)
            views.append(reference_view(img, sample_view_params(gen, spec, height, width).row(0), spec))
        return views, label, used, bad


class _EvalImages(Dataset):
    """Item i: the deterministic evaluation crop of one image."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, small: bool):
        self.samples, self.image_size, self.small = samples, image_size, small

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        img, label, used, bad = decode_or_substitute(self.samples, index)
        size = self.image_size
        if self.small:
            img = F.resize(img, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        else:  # the standard ImageNet evaluation crop: shorter side to 256/224 of the size, centre
            img = F.resize(img, round(size * 256 / 224), interpolation=InterpolationMode.BICUBIC,
                           antialias=True)
            img = F.center_crop(img, [size, size])
        return [img], label, used, bad


def _collate(items):
    images, labels, index, bad = zip(*items)
    return ([torch.stack(view) for view in zip(*images)], torch.tensor(labels, dtype=torch.int64),
            torch.tensor(index, dtype=torch.int64), list(itertools.chain.from_iterable(bad)))


# ---- Loaders ------------------------------------------------------------------------------------

class _FolderLoader:
    """What the training and evaluation loaders share: the scanned split, the device, the DataLoader
    settings, and the bad-file report (`bad_files`: path -> times met; each path logged once)."""

    def __init__(self, root: str | os.PathLike, split: str, workers: int, device: str | torch.device):
        self.root, self.split = Path(root), split
        self.classes, self.samples = scan_image_folder(split_folder(root, split))
        self.workers = workers
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.bad_files: Counter[str] = Counter()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _run(self, dataset: Dataset, batches: list[list[int]]) -> Iterator[tuple]:
        """Yield (normalized images per view, labels, index) on the device, batch by batch."""
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                            collate_fn=_collate, pin_memory=self.device.type == "cuda",
                            # Its own generator: otherwise each epoch draws a worker base seed
                            # from (and so shifts) the global torch RNG.
                            generator=torch.Generator())
        for images, labels, index, bad in loader:
            self._report(bad)
            yield ([normalize(view.to(self.device, non_blocking=True), self.dtype) for view in images],
                   labels.to(self.device), index.to(self.device))

    def _report(self, bad: list[BadFile]) -> None:
        for path, reason in bad:
            if path not in self.bad_files:
                log.warning("bad image file %s (%s): substituted by the next image that decodes",
                            path, reason)
            self.bad_files[path] += 1


class TorchvisionLoader(_FolderLoader):
    """BYOL training views from an ImageFolder split. `epoch(e)` yields this rank's `Views` batches;
    len() is the number of batches per epoch (the same on every rank). `subset` > 0 trains on a fixed
    random subset of that many images (keyed by seed); Views.index still names dataset indices."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, batch_size: int,
                 image_size: int = 224, small: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0, device: str | torch.device = "cpu",
                 crop_scale: tuple[float, float] = (0.08, 1.0), subset: int = 0):
        super().__init__(root, split, workers, device)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.specs = byol_view_specs(image_size, small=small, scale=crop_scale)
        self.indices = fixed_subset(len(self.samples), subset or None, seed)
        if len(self) == 0:
            raise InputError(f"{self.root}: {len(self.indices)} {split} images are fewer than one "
                             f"global batch ({batch_size} x {world_size} ranks)")

    def __len__(self) -> int:
        return len(self.indices) // (self.batch_size * self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Views]:
        """This rank's batches of epoch `epoch`, from batch `start_batch` on (skipped batches are
        never decoded, so a resumed run continues exactly)."""
        positions = epoch_batches(len(self.indices), self.batch_size, self.world_size, self.rank,
                                  self.seed, epoch)[start_batch:]
        batches = [[self.indices[p] for p in batch] for batch in positions]
        dataset = _TrainViews(self.samples, self.specs, self.seed, epoch)
        for (v1, v2), labels, index in self._run(dataset, batches):
            yield Views(v1, v2, labels, index)


class EvalLoader(_FolderLoader):
    """Deterministic evaluation crops (k-NN bank and queries, linear probe), iterated as
    (images, labels, index) batches. `max_samples` keeps a random subset keyed by `seed`; under
    world_size > 1 each rank reads a disjoint contiguous slice of it, without padding."""

    def __init__(self, root: str | os.PathLike, split: str = "val", *, image_size: int,
                 batch_size: int, small: bool = False, workers: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 max_samples: int | None = None, seed: int = 0):
        super().__init__(root, split, workers, device)
        self.image_size, self.batch_size, self.small = image_size, batch_size, small
        chosen = fixed_subset(len(self.samples), max_samples, seed)
        self.indices = chosen[rank * len(chosen) // world_size:(rank + 1) * len(chosen) // world_size]

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = [self.indices[k:k + self.batch_size]
                   for k in range(0, len(self.indices), self.batch_size)]
        dataset = _EvalImages(self.samples, self.image_size, self.small)
        for (images,), labels, index in self._run(dataset, batches):
            yield images, labels, index
