"""The memory loader, for data that fits on the device (Fashion-MNIST, CIFAR, Imagenette at 160 px).

Every image of a split is decoded ONCE, at start-up, into one flat uint8 buffer on the training device
(host memory on the CPU): from an ImageFolder with the reference decode (PIL, EXIF upright, RGB:
fastbyol.pipelines.torchvision.decode_image), or from the converter's OUT/<split>.beton with FFCV's
decoder (fastbyol.pipelines.ffcv.read_image). Before decoding, the size the images will take is read
from their headers (the .beton metadata) and stated; data that would not fit (memory_budget) is
refused with an InputError pointing at `--loader dali|ffcv`.

Each training batch is then: this rank's `epoch_batches` order -> `sample_view_params` on the host
(the reference loader's keys: the same crop boxes, flips and colour parameters for (seed, epoch,
index)) -> crop_resize -> photometric on the device, one batch ahead on a side stream
(fastbyol.pipelines.prefetch). On the CPU, where the engine is CPU work, worker processes make the
views beside the step, as the reference loader's workers do, and the pixels equal the reference
loader's bit for bit; on a GPU they are within the kernels' tolerances.

Bad files are handled as the reference handles them: a file that does not decode is counted in
`bad_files` and logged once, and the next index (cyclically) that decodes stands in for it wherever
it is drawn, so batches keep their size and Views.index names the stand-in, whose views are exactly
its own. Since every file is decoded once, each bad file is met (and counted) once.

The decoded splits are kept in a small module-level cache keyed by (root, split, device), so that
the training loader and the k-NN / linear evaluation loaders of a run, built again for every
evaluation, share one decode. It holds at most RESIDENT_SPLITS splits (a run's train and val); a
new split evicts the least recently used one before it is decoded. An entry is reused only while
the folder still lists the same files with the same labels.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fastbyol import InputError
from fastbyol.kernels.augment import normalize
from fastbyol.kernels.crop_resize import PackedImages, crop_resize, pack_images
from fastbyol.pipelines import torchvision as reference
from fastbyol.pipelines.prefetch import ViewJob, crop_views, make_view_job, prefetch, to_device
from fastbyol.views import (Views, byol_view_specs, epoch_batches, eval_indices, sample_view_params,
                            training_indices, view_dtype)

log = logging.getLogger(__name__)

RESIDENT_SHARE = 0.5   # of the memory free at start-up: the rest is the model's, the step's and the views'
RESIDENT_SPLITS = 2    # decoded splits kept per process: one run's train and val
CHUNK = 256            # images per decoding task
GIB = 2**30


def memory_budget(device: torch.device) -> int:
    """Bytes the resident images of one split may take: RESIDENT_SHARE of the device memory free now
    (what the driver has free plus what torch holds unused), or on the CPU of the available RAM,
    shared by this node's ranks (each holds its own copy)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _available_ram() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(free * RESIDENT_SHARE)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---- Sources: where the encoded images come from ------------------------------------------------

def is_beton_root(root: str | os.PathLike) -> bool:
    """A converter output folder (OUT/train.beton, OUT/val.beton), rather than an ImageFolder."""
    root = Path(root)
    return (root / "train.beton").is_file() or (root / "val.beton").is_file()


def header_bytes(paths: list[str]) -> list[int]:
    """3 * H * W of each image file, from its header (0 when it does not open: it will not decode)."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.append(3 * img.width * img.height)  # EXIF rotation keeps the product
        except Exception:  # a bad file: its decode reports it
            sizes.append(0)
    return sizes


def _beton_sizes(path: Path):
    """(reader, 3 * H * W of each image, labels) of a .beton, from its metadata."""
    from fastbyol.pipelines.ffcv import open_beton
    reader = open_beton(path)  # InputError naming the file when it is missing or damaged
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    labels = np.asarray(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64)
    return reader, 3 * meta["height"].astype(np.int64) * meta["width"].astype(np.int64), labels


class _FolderSource:
    """An ImageFolder split, numbered as the reference loader numbers it, decoded as it decodes."""

    def __init__(self, root: Path, split: str):
        classes, samples = reference.scan_image_folder(reference.split_folder(root, split))
        self.num_classes = len(classes)
        self.names = [path for path, _ in samples]
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.identity = (tuple(self.names), self.labels.tobytes())

    def pixel_bytes(self, start: int, stop: int) -> list[int]:
        return header_bytes(self.names[start:stop])

    def decode(self, i: int) -> torch.Tensor:
        return reference.decode_image(self.names[i])


class _BetonSource:
    """OUT/<split>.beton of `python -m fastbyol.convert DIR --to ffcv`: labels and sizes from its
    metadata, images from FFCV's decoder. Sample i is named by OUT/<split>_paths.txt when present."""

    def __init__(self, root: Path, split: str):
        # FFCV's decoder modules (numba-compiled on import) load here, once: worker processes
        # forked later inherit them instead of compiling them again each.
        import ffcv.fields.rgb_image  # noqa: F401
        import ffcv.libffcv  # noqa: F401
        self.path = root / f"{split}.beton"
        _, self._bytes, self.labels = _beton_sizes(self.path)
        classes = root / "classes.json"
        self.num_classes = (len(json.loads(classes.read_text())) if classes.is_file()
                            else int(self.labels.max(initial=-1)) + 1)
        paths = root / f"{split}_paths.txt"
        self.names = (paths.read_text().splitlines() if paths.is_file()
                      else [f"{self.path}:{i}" for i in range(len(self.labels))])
        stat = self.path.stat()
        self.identity = (str(self.path), stat.st_size, stat.st_mtime_ns)
        self._reader = None  # opened in each process that decodes

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    def pixel_bytes(self, start: int, stop: int) -> list[int]:
        return self._bytes[start:stop].tolist()

    def decode(self, i: int) -> torch.Tensor:
        from fastbyol.pipelines.ffcv import open_beton, read_image
        if self._reader is None:
            self._reader = open_beton(self.path)
        return torch.from_numpy(read_image(self._reader, i)).permute(2, 0, 1).contiguous()


def _source(root: str | os.PathLike, split: str):
    root = Path(root)
    return _BetonSource(root, split) if is_beton_root(root) else _FolderSource(root, split)


# ---- Decoding once ------------------------------------------------------------------------------

class _Chunks(Dataset):
    """Item k: `stage` of images [k * CHUNK, (k + 1) * CHUNK): their header sizes, or their decode."""

    def __init__(self, source, stage: str):
        self.source, self.stage = source, stage
        self.count = len(source.labels)

    def __len__(self) -> int:
        return math.ceil(self.count / CHUNK)

    def __getitem__(self, k: int):
        start, stop = k * CHUNK, min(self.count, (k + 1) * CHUNK)
        if self.stage == "headers":
            return self.source.pixel_bytes(start, stop)
        images, good, bad = [], [], []
        for i in range(start, stop):
            try:
                images.append(self.source.decode(i))
                good.append(i)
            # As the reference: any exception means "this file is bad", never "stop".
            except Exception as err:
                bad.append((i, f"{type(err).__name__}: {err}"))
        return good, pack_images(images), bad


def _as_is(item):
    """The DataLoader's collate_fn: items are whole chunks already."""
    return item


def _chunks(source, stage: str, workers: int, pin: bool):
    # Its own generator: otherwise the DataLoader draws a worker seed from the global torch RNG.
    return DataLoader(_Chunks(source, stage), batch_size=None, num_workers=workers, pin_memory=pin,
                      collate_fn=_as_is, generator=torch.Generator())


@dataclass
class ResidentSplit:
    """Every image of a split, decoded: image i is images[offsets[i]:...] as PackedImages lays it
    out, with the upright heights[i] x widths[i] (host arrays, for the parameter draw and the batch
    rows). stand_in[i] is i, or for a bad file the next index that decodes."""

    data: torch.Tensor  # flat uint8, on the device
    offsets: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    labels: np.ndarray
    stand_in: np.ndarray
    names: list[str]
    num_classes: int
    bad: dict[str, str]  # path -> reason
    identity: tuple

    def __len__(self) -> int:
        return len(self.labels)

    def packed(self, used: np.ndarray) -> PackedImages:
        """The images `used` (dataset indices that decode) as a PackedImages over the resident data:
        host row tables, no pixel copied."""
        return PackedImages(self.data, torch.from_numpy(self.offsets[used]),
                            torch.from_numpy(self.heights[used]), torch.from_numpy(self.widths[used]))


def decode_split(source, root: Path, split: str, device: torch.device, workers: int,
                 progress: bool) -> ResidentSplit:
    """Read the sizes, state them, refuse what would not fit, then decode every image once into one
    buffer on `device`."""
    count = len(source.labels)
    sizes = np.fromiter((size for chunk in _chunks(source, "headers", workers, False) for size in chunk),
                        dtype=np.int64, count=count)
    total, budget = int(sizes.sum()), memory_budget(device)
    where = f"{device}" if device.type == "cuda" else "host memory"
    if total > budget:
        raise InputError(
            f"{root}: the {count:,} decoded {split} images need "
            f"{_size(total)}, over the {_size(budget)} the memory loader may take in {where} "
            f"({RESIDENT_SHARE:.0%} of what is free); use --loader dali|ffcv for data this size")
    log.info("memory loader: decoding %s images of %s once into %s: %s of pixels (%s allowed)",
             f"{count:,} {split}", root, where, _size(total), _size(budget))
    data = torch.empty(total, dtype=torch.uint8, device=device)
    offsets, heights, widths = (np.zeros(count, dtype=np.int64) for _ in range(3))
    decoded = np.zeros(count, dtype=bool)
    bad: dict[str, str] = {}
    cursor = 0
    with tqdm(total=count, desc=f"decoding {split} into {where}", unit="img",
              mininterval=1.0, disable=not progress) as bar:
        for good, packed, failed in _chunks(source, "decode", workers, device.type == "cuda"):
            nbytes = len(packed.data)
            if cursor + nbytes > total:  # a header that disagrees with its image
                raise InputError(f"{source.names[good[0]]}...: images decode larger than their headers "
                                 "say; use --loader torchvision")
            data[cursor:cursor + nbytes].copy_(packed.data, non_blocking=True)
            offsets[good] = packed.offsets.numpy() + cursor
            heights[good], widths[good] = packed.heights.numpy(), packed.widths.numpy()
            decoded[good] = True
            cursor += nbytes
            for i, reason in failed:
                log.warning("bad image file %s (%s): the next image that decodes stands in for it",
                            source.names[i], reason)
                bad[source.names[i]] = reason
            bar.update(len(good) + len(failed))
    if count and not decoded.any():
        raise InputError(f"{root}: no image in the {split} split decodes "
                         f"(first error: {next(iter(bad.values()))})")
    return ResidentSplit(data, offsets, heights, widths, source.labels, _stand_ins(decoded),
                         source.names, source.num_classes, bad, source.identity)


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def _stand_ins(decoded: np.ndarray) -> np.ndarray:
    """For each index, itself if it decoded, else the next index (cyclically) that did: the
    reference's substitution (decode_or_substitute)."""
    count = len(decoded)
    good = np.flatnonzero(decoded)
    if not len(good):
        return np.arange(count)
    after = np.searchsorted(good, np.arange(count))  # first good index >= i
    return good[after % len(good)]


_RESIDENT: OrderedDict[tuple, ResidentSplit] = OrderedDict()


def resident_split(root: str | os.PathLike, split: str, device: torch.device, workers: int,
                   progress: bool = True) -> ResidentSplit:
    """The decoded split, from the cache (see the module docstring) or decoded now."""
    source = _source(root, split)
    key = (str(Path(root).resolve()), split, str(device))
    found = _RESIDENT.get(key)
    if found is not None and found.identity == source.identity:
        _RESIDENT.move_to_end(key)
        return found
    _RESIDENT.pop(key, None)
    while len(_RESIDENT) >= RESIDENT_SPLITS:  # freed before the new split takes its memory
        _RESIDENT.popitem(last=False)
    _RESIDENT[key] = decode_split(source, Path(root), split, device, workers, progress)
    return _RESIDENT[key]


def native_side(root: str | os.PathLike, split: str = "train", probe: int = 16) -> int:
    """The largest side among the first `probe` images, as the reference loader probes them."""
    if not is_beton_root(root):
        return reference.native_side(root, split, probe)
    reader, _, _ = _beton_sizes(Path(root) / f"{split}.beton")
    meta = reader.metadata[f"f{reader.field_names.index('image')}"][:probe]
    return int(np.maximum(meta["height"], meta["width"]).max(initial=0))


# ---- Loaders ------------------------------------------------------------------------------------

class _MemoryLoader:
    """What the training and evaluation loaders share: the resident split, device and dtype."""

    def __init__(self, root, split: str, workers: int, device, dtype, progress: bool):
        self.root, self.split = Path(root), split
        self.device = torch.device(device)
        self.dtype = dtype or view_dtype("bf16", self.device)
        self.resident = resident_split(root, split, self.device, workers, progress)
        self.bad_files: Counter[str] = Counter(self.resident.bad.keys())  # each met once: at the decode

    @property
    def num_classes(self) -> int:
        return self.resident.num_classes

    @property
    def dataset_size(self) -> int:
        return len(self.resident)


class MemoryLoader(_MemoryLoader):
    """BYOL training views from the resident split (the interface of fastbyol.pipelines): `epoch(e)`
    yields this rank's Views, the reference loader's for the same arguments. `workers` decode at
    start-up; afterwards, on a GPU, the host only draws parameters (on the CPU, `workers` also make
    the views, as the reference loader's do)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, batch_size: int,
                 image_size: int = 224, small: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0, device: str | torch.device = "cpu",
                 crop_scale: tuple[float, float] = (0.08, 1.0), subset: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__(root, split, workers, device, dtype, progress=rank == 0)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.workers = workers
        self.specs = byol_view_specs(image_size, small=small, scale=crop_scale)
        self.indices = training_indices(len(self.resident), subset, seed, batch_size, world_size,
                                        f"{self.root} ({split})")

    def __len__(self) -> int:
        return len(self.indices) // (self.batch_size * self.world_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Views]:
        """This rank's batches of epoch `epoch`, from batch `start_batch` on."""
        indices = np.asarray(self.indices, dtype=np.int64)
        batches = [indices[batch] for batch in epoch_batches(
            len(indices), self.batch_size, self.world_size, self.rank, self.seed, epoch)[start_batch:]]
        if self.device.type == "cpu":
            return self._cpu_epoch(epoch, batches)
        jobs = (view_job(self.resident, self.specs, self.seed, epoch, batch) for batch in batches)
        return prefetch(jobs, lambda job: crop_views(job, self.specs, self.dtype), self.device)

    def _cpu_epoch(self, epoch: int, batches: list[np.ndarray]) -> Iterator[Views]:
        """On the CPU the engine is CPU work like the step's: as in the reference loader, `workers`
        processes (which inherit the resident images) make the uint8 views beside the step, and this
        process normalizes them."""
        loader = DataLoader(_CpuViews(self.resident, self.specs, self.seed, epoch), sampler=batches,
                            batch_size=None, num_workers=self.workers, collate_fn=_as_is,
                            generator=torch.Generator())
        for views in loader:
            yield views._replace(v1=normalize(views.v1, self.dtype), v2=normalize(views.v2, self.dtype))


def view_job(resident: ResidentSplit, specs, seed: int, epoch: int, batch: np.ndarray) -> ViewJob:
    """One batch's work for the engine: the images of `batch` (or their stand-ins) and both views'
    parameters, keyed as the reference loader keys them."""
    used = resident.stand_in[batch]
    heights, widths = torch.from_numpy(resident.heights[used]), torch.from_numpy(resident.widths[used])
    params = tuple(sample_view_params(seed, epoch, used, view, spec, heights, widths)
                   for view, spec in enumerate(specs))
    return make_view_job(resident.packed(used), params, torch.from_numpy(resident.labels[used]),
                         torch.from_numpy(used))


class _CpuViews(Dataset):
    """Item `batch` (dataset indices): its uint8 Views, made from the resident images."""

    def __init__(self, resident: ResidentSplit, specs, seed: int, epoch: int):
        self.resident, self.specs, self.seed, self.epoch = resident, specs, seed, epoch

    def __getitem__(self, batch: np.ndarray) -> Views:
        return crop_views(view_job(self.resident, self.specs, self.seed, self.epoch, batch), self.specs, None)


class MemoryEvalLoader(_MemoryLoader):
    """The reference EvalLoader's deterministic evaluation crops, from the resident split, as
    (images, labels, index) batches on the device: the same subset (`max_samples`, `seed`) and the same
    contiguous per-rank slices."""

    def __init__(self, root: str | os.PathLike, split: str = "val", *, image_size: int,
                 batch_size: int, small: bool = False, workers: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 max_samples: int | None = None, seed: int = 0, dtype: torch.dtype | None = None):
        super().__init__(root, split, workers, device, dtype, progress=rank == 0)
        self.image_size, self.batch_size, self.small = image_size, batch_size, small
        self.indices = eval_indices(len(self.resident), max_samples, seed, rank, world_size)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def _crops(self, images: PackedImages, host: PackedImages, boxes: torch.Tensor) -> torch.Tensor:
        """images: the batch with its tables on the device; host: the same batch with host tables
        (the resident pixels either way), read on the host: reading the device copies would be a host
        sync per image."""
        if self.small:  # the whole image resized to size x size: crop_resize with the full box
            return crop_resize(images, boxes, torch.zeros_like(boxes[:, 0], dtype=torch.bool),
                               self.image_size, max_height=int(host.heights.max()))
        # The shorter side resized, then a centre crop: not a crop box, so the reference's own ops.
        return torch.stack([reference.eval_crop(host.image(i), self.image_size, small=False)
                            for i in range(len(host))])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        indices = np.asarray(self.indices, dtype=np.int64)
        for start in range(0, len(indices), self.batch_size):
            used = self.resident.stand_in[indices[start:start + self.batch_size]]
            host = self.resident.packed(used)
            boxes = torch.stack([torch.zeros_like(host.heights), torch.zeros_like(host.heights),
                                 host.heights, host.widths], dim=1)
            images, boxes, labels, index = to_device(
                (host, boxes, torch.from_numpy(self.resident.labels[used]), torch.from_numpy(used)),
                self.device)
            yield normalize(self._crops(images, host, boxes), self.dtype), labels, index


def estimated_bytes(root: str | os.PathLike, split: str = "train", probe: int = 16,
                    stop_above: int | None = None) -> int:
    """The decoded size of a split, estimated cheaply: exact from a .beton's metadata; for a folder,
    the mean 3 * H * W of the first `probe` images that open times the number of image files, counted
    only until the estimate passes `stop_above` (so a huge folder is not walked to its end)."""
    if is_beton_root(root):
        return int(_beton_sizes(Path(root) / f"{split}.beton")[1].sum())
    folder = reference.split_folder(root, split)
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not reference.is_hidden(e.name))
    paths = (path for name in classes for path, not_image in reference.walk_class_folder(folder / name)
             if not_image is None)
    sizes, count = [], 0
    for path in paths:
        count += 1
        if len(sizes) < probe:
            sizes.extend(size for size in header_bytes([path]) if size)
        if stop_above is not None and sizes and count * np.mean(sizes) > stop_above:
            break
    return int(count * np.mean(sizes)) if sizes else 0
