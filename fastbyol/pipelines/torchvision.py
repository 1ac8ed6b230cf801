"""The reference loader: PIL decode with EXIF orientation, torchvision ops on uint8 tensors, a torch
DataLoader. Obviously right: the baseline that faster pipelines are measured and tested against.

Workers decode each image once, draw both views' params for their whole batch and crop each view.
The colour stage is photometric_batched (the default) or, as the baseline, photometric_reference per
sample; see TorchvisionLoader for where each runs. Normalisation happens in the main process, on the
device (`normalize`).
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode

from fastbyol import InputError
from fastbyol.kernels.augment import normalize, photometric_batched, photometric_reference_batch
from fastbyol.kernels.crop_resize import crop_and_flip
from fastbyol.views import (ViewParams, ViewSpec, Views, byol_view_specs, epoch_batches, eval_indices,
                            sample_view_params, training_indices, view_dtype)

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


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_class_folder(folder: Path) -> Iterator[tuple[str, str | None]]:
    """Every file below a class folder, in torchvision ImageFolder's order (sorted os.walk: by
    directory, then by name), with None for an image file or the reason it is not one. Every loader
    and the converter number samples this way, so an index means the same file everywhere. Symlinks
    are followed once: a directory already visited (a link cycle) is not entered again."""
    visited, found = set(), []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        found.append((dirpath, sorted(filenames)))
    for dirpath, filenames in sorted(found):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if is_hidden(name):
                yield path, "hidden file"
            elif os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                yield path, "not an image file name"
            else:
                yield path, None


def _images_under(folder: Path) -> list[str]:
    return [path for path, not_image in walk_class_folder(folder) if not_image is None]


def scan_image_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of an ImageFolder split: classes sorted by name as torchvision sorts them,
    samples as (path, label). A class folder without images keeps its label, with a warning."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name))
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


def native_side(root: str | os.PathLike, split: str = "train", probe: int = 16) -> int:
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

def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode to 3-channel RGB, as the converter stores it too."""
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
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the (usual) upright image
        rgb = to_rgb(img)
    # asarray views PIL's pixels read-only; the transposed copy is the tensor's own CHW memory.
    return torch.from_numpy(np.asarray(rgb).transpose(2, 0, 1).copy())


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


def decode_batch(samples: list[tuple[str, int]], indices: list[int]
                 ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[BadFile]]:
    """decode_or_substitute for each index: (images, labels, indices actually decoded, bad files)."""
    images, labels, used, bad = zip(*(decode_or_substitute(samples, index) for index in indices))
    return (list(images), torch.tensor(labels, dtype=torch.int64), torch.tensor(used, dtype=torch.int64),
            [file for files in bad for file in files])


# ---- Views --------------------------------------------------------------------------------------

# TorchvisionLoader's photometric modes: the colour stage each applies to a uint8 batch of views.
PHOTOMETRIC = {"batched": photometric_batched, "reference": photometric_reference_batch}


class _TrainBatches(Dataset):
    """Item `indices`: one batch of both views. Each image is decoded once and cropped twice, with
    params keyed by (seed, epoch, index, view) and drawn for the whole batch at once; a substituted
    sample is exactly what its stand-in index yields. `colour`, when given, is the photometric stage
    run here, in the worker; otherwise the views leave geometric-only, with their params."""

    def __init__(self, samples: list[tuple[str, int]], specs: tuple[ViewSpec, ViewSpec], seed: int,
                 epoch: int, colour: Callable[[torch.Tensor, ViewParams, ViewSpec], torch.Tensor] | None):
        self.samples, self.specs, self.seed, self.epoch = samples, specs, seed, epoch
        self.colour = colour

    def __getitem__(self, indices: list[int]):
        images, labels, used, bad = decode_batch(self.samples, indices)
        heights, widths = torch.tensor([img.shape[-2:] for img in images]).unbind(1)
        views, params = [], []
        for view, spec in enumerate(self.specs):
            view_params = sample_view_params(self.seed, self.epoch, used, view, spec, heights, widths)
            # Plain lists: per-sample tensor indexing would cost as much as the draws.
            crops = torch.stack([crop_and_flip(img, box, flip, spec.size) for img, box, flip in
                                 zip(images, view_params.crop.tolist(), view_params.flip.tolist())])
            views.append(crops if self.colour is None else self.colour(crops, view_params, spec))
            params.append(view_params)
        return views, params, labels, used, bad


def eval_crop(img: torch.Tensor, size: int, small: bool) -> torch.Tensor:
    """The deterministic evaluation view of a uint8 (3, H, W) image: small images resized to
    size x size; others the standard ImageNet crop (shorter side to 256/224 of the size, centre)."""
    if small:
        return F.resize(img, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    img = F.resize(img, round(size * 256 / 224), interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(img, [size, size])


class _EvalBatches(Dataset):
    """Item `indices`: the deterministic evaluation crops of one batch of images."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, small: bool):
        self.samples, self.image_size, self.small = samples, image_size, small

    def __getitem__(self, indices: list[int]):
        images, labels, used, bad = decode_batch(self.samples, indices)
        return (torch.stack([eval_crop(img, self.image_size, self.small) for img in images]), labels,
                used, bad)


def _as_is(batch):
    """The DataLoader's collate_fn: items are whole batches already."""
    return batch


# ---- Loaders ------------------------------------------------------------------------------------

class _FolderLoader:
    """What the training and evaluation loaders share: the scanned split, the device, the DataLoader
    settings, and the bad-file report (`bad_files`: path -> times met; each path logged once)."""

    def __init__(self, root: str | os.PathLike, split: str, workers: int, device: str | torch.device,
                 dtype: torch.dtype | None):
        self.root, self.split = Path(root), split
        self.classes, self.samples = scan_image_folder(split_folder(root, split))
        self.workers = workers
        self.device = torch.device(device)
        self.dtype = dtype or view_dtype("bf16", self.device)
        self.bad_files: Counter[str] = Counter()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dataset_size(self) -> int:
        return len(self.samples)

    def _run(self, dataset: Dataset, batches: list[list[int]]) -> Iterator[tuple]:
        """Yield dataset[batch] for each batch (all but its bad files, which are reported)."""
        loader = DataLoader(dataset, sampler=batches, batch_size=None, num_workers=self.workers,
                            collate_fn=_as_is, pin_memory=self.device.type == "cuda",
                            # Its own generator: otherwise each epoch draws a worker base seed
                            # from (and so shifts) the global torch RNG.
                            generator=torch.Generator())
        for *batch, bad in loader:
            self._report(bad)
            yield batch

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images.to(self.device, non_blocking=True), self.dtype)

    def _report(self, bad: list[BadFile]) -> None:
        for path, reason in bad:
            if path not in self.bad_files:
                log.warning("bad image file %s (%s): substituted by the next image that decodes",
                            path, reason)
            self.bad_files[path] += 1


class TorchvisionLoader(_FolderLoader):
    """BYOL training views from an ImageFolder split. `epoch(e)` yields this rank's `Views` batches;
    len() is the number of batches per epoch (the same on every rank). `dtype`: the views' dtype
    (views.view_dtype of the step's precision; None: bf16 on GPUs, fp32 on the CPU). `subset` > 0 trains on a fixed
    random subset of that many images (keyed by seed); Views.index still names dataset indices.

    photometric="batched" (the default) runs the colour stage as photometric_batched: with a GPU
    device in the main process, on the device, over whole batches; with the CPU in the workers, over
    each worker's batch, so that it runs in parallel with decoding instead of competing with the
    step's threads. "reference" runs photometric_reference per sample in the workers: the baseline.
    Both yield the same Views."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, batch_size: int,
                 image_size: int = 224, small: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0, device: str | torch.device = "cpu",
                 crop_scale: tuple[float, float] = (0.08, 1.0), subset: int = 0,
                 dtype: torch.dtype | None = None, photometric: str = "batched"):
        if photometric not in PHOTOMETRIC:
            raise ValueError(f"photometric={photometric!r}: expected one of {tuple(PHOTOMETRIC)}")
        super().__init__(root, split, workers, device, dtype)
        self.photometric = photometric
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.specs = byol_view_specs(image_size, small=small, scale=crop_scale)
        self.indices = training_indices(len(self.samples), subset, seed, batch_size, world_size,
                                        f"{self.root} ({split})")

    def __len__(self) -> int:
        return len(self.indices) // (self.batch_size * self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Views]:
        """This rank's batches of epoch `epoch`, from batch `start_batch` on (skipped batches are
        never decoded, so a resumed run continues exactly)."""
        positions = epoch_batches(len(self.indices), self.batch_size, self.world_size, self.rank,
                                  self.seed, epoch)[start_batch:]
        batches = [[self.indices[p] for p in batch] for batch in positions]
        colour = PHOTOMETRIC[self.photometric]
        on_device = colour is photometric_batched and self.device.type != "cpu"
        dataset = _TrainBatches(self.samples, self.specs, self.seed, epoch, None if on_device else colour)
        for views, params, labels, index in self._run(dataset, batches):
            if on_device:
                views = [photometric_batched(crops.to(self.device, non_blocking=True), view_params, spec)
                         for crops, view_params, spec in zip(views, params, self.specs)]
            v1, v2 = (self._normalized(view) for view in views)
            yield Views(v1, v2, labels.to(self.device, non_blocking=True),
                        index.to(self.device, non_blocking=True))


class EvalLoader(_FolderLoader):
    """Deterministic evaluation crops (k-NN bank and queries, linear probe), iterated as
    (images, labels, index) batches. `max_samples` keeps a random subset keyed by `seed`; under
    world_size > 1 each rank reads a disjoint contiguous slice of it, without padding."""

    def __init__(self, root: str | os.PathLike, split: str = "val", *, image_size: int,
                 batch_size: int, small: bool = False, workers: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 max_samples: int | None = None, seed: int = 0, dtype: torch.dtype | None = None):
        super().__init__(root, split, workers, device, dtype)
        self.image_size, self.batch_size, self.small = image_size, batch_size, small
        self.indices = eval_indices(len(self.samples), max_samples, seed, rank, world_size)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = [self.indices[k:k + self.batch_size]
                   for k in range(0, len(self.indices), self.batch_size)]
        dataset = _EvalBatches(self.samples, self.image_size, self.small)
        for images, labels, index in self._run(dataset, batches):
            yield (self._normalized(images), labels.to(self.device, non_blocking=True),
                   index.to(self.device, non_blocking=True))
