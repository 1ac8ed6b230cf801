"""The DALI loader: JPEGs decoded once by DALI (nvJPEG on the GPU: the hardware decoder for a share
`hw_decoder_load` of the images, CUDA for the rest), both views cut from that one decode by two
`fn.slice` + `fn.resize` with the per-sample crop boxes, then our photometric stage.

    external_source (Python workers: read bytes, draw params) -> decoders.image (once)
        -> slice(box of view 1) -> resize -> flip ─┐
        -> slice(box of view 2) -> resize -> flip ─┴-> torch (DLPack, no copy) -> photometric -> Views

It reads what `python -m fastbyol.convert DIR --to dali` writes (fastbyol.dali_lists): every listed
file decodes, and each one's upright size is known before decoding, which the sampler needs for the
crop boxes. A plain ImageFolder is refused with the command to run: DALI cannot skip a bad file in
the middle of a batch (NVIDIA/DALI#3913), so an unvalidated folder could stop a run hours in.

Order and parameters are every loader's: this rank's `epoch_batches`, and `sample_view_params` keyed by
(seed, epoch, dataset index, view). The dataset index is the line of the file list, which equals the
reference loader's folder numbering when the converter skipped no file. The workers draw each
batch's parameters once; the crop boxes and flips drive DALI's slice, resize and flip, and the rest travel
beside the views (as one float32 row per sample) to the photometric stage.

Without CUDA the same graph runs on the CPU (`device_id=None`), with a warning: only the decoder's
place differs. DALI is imported on first use, so the converter and this module's helpers work
without it.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fastbyol import InputError
from fastbyol.dali_lists import CONVERT_HINT, Split, read_split
from fastbyol.kernels.augment import normalize, photometric
from fastbyol.views import (ViewParams, ViewSpec, Views, byol_view_specs, epoch_batches, eval_indices,
                            sample_view_params, training_indices, view_dtype)

log = logging.getLogger(__name__)

DECODER_OP = "decoders__Image"  # the decoder's name in a serialized DALI graph
# A worker's message for a bad input file starts with this, so the main process can raise it as an
# InputError (DALI re-raises a parallel worker's exception as a plain Exception with its traceback).
INPUT_ERROR_MARK = "fastbyol input error: "
NATIVE_SIDE_PROBE = 16  # the reference loader's rule: the largest side among the first 16 images


def import_dali():
    """(fn, types, pipeline_def) of nvidia.dali, or an InputError naming the extra to install."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as err:
        raise InputError(f"--loader dali needs NVIDIA DALI, which does not import ({err}): "
                         "pip install 'fastbyol[dali]' (CUDA 13; 'fastbyol[dali-cu12]' for CUDA 12)") from None
    return fn, types, pipeline_def


# ---- The data: a converter output ------------------------------------------------------------------

def open_split(root: str | os.PathLike, split: str) -> tuple[Split, list[str]]:
    """(the split's list and sizes, the class names) of a converter output; an InputError that says
    what to run for anything else."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    if not (root / "report.json").is_file():
        raise InputError(f"{root}: --loader dali reads a converted folder (DALI cannot skip a bad file, "
                         f"so the converter checks every one first): run `python -m fastbyol.convert "
                         f"{root} --to dali` and pass its output (default {root}-dali) as --data")
    if not (root / "classes.json").is_file() or not (root / f"{split}.txt").is_file():
        raise InputError(f"{root}: no {split}.txt DALI file list here (a --to ffcv output?); run "
                         f"`{CONVERT_HINT}`")
    classes = json.loads((root / "classes.json").read_text())
    return read_split(root, split), classes


def native_side(root: str | os.PathLike) -> int:
    """The largest side among the first 16 listed images, the reference loader's rule (it decides
    small-image mode), from the recorded sizes."""
    data, _ = open_split(root, "train")
    sides = np.maximum(data.heights, data.widths)[:NATIVE_SIDE_PROBE]
    if not len(sides):
        raise InputError(f"{root}: the train list is empty")
    return int(sides.max())


# ---- Parameters through the pipeline ---------------------------------------------------------------

PARAM_COLUMNS = 18  # crop 4, flip, jitter, factors 4, order 4, gray, blur, sigma, solarize


def pack_params(p: ViewParams) -> np.ndarray:
    """ViewParams of n samples as float32 (n, 18): exact (sizes < 2**24, factors and sigma float32)."""
    columns = [p.crop, p.flip[:, None], p.jitter[:, None], p.factors, p.order, p.gray[:, None],
               p.blur[:, None], p.sigma[:, None], p.solarize[:, None]]
    return torch.cat([c.to(torch.float32) for c in columns], dim=1).numpy()


def unpack_params(rows: torch.Tensor) -> ViewParams:
    """pack_params' inverse, for CPU float32 (n, 18)."""
    crop, flip, jitter, factors, order, gray, blur, sigma, solarize = rows.split(
        [4, 1, 1, 4, 4, 1, 1, 1, 1], dim=1)
    return ViewParams(crop.to(torch.int64), flip[:, 0] > 0, jitter[:, 0] > 0, factors.contiguous(),
                      order.to(torch.int64), gray[:, 0] > 0, blur[:, 0] > 0, sigma[:, 0].contiguous(),
                      solarize[:, 0] > 0)


class _Files:
    """The listed files, compact enough to pickle to every DALI worker (one bytes buffer of paths),
    read with the checks that catch a folder changed since the conversion."""

    def __init__(self, data: Split):
        encoded = [p.encode() for p in data.paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels, self.heights, self.widths, self.nbytes = data.labels, data.heights, data.widths, data.nbytes

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def read(self, i: int) -> np.ndarray:
        path = self.path(i)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise RuntimeError(f"{INPUT_ERROR_MARK}{path}: cannot be read ({err.strerror or err}); moved "
                               f"or deleted since the conversion? run `{CONVERT_HINT} --overwrite`") from None
        if len(data) != self.nbytes[i]:
            raise RuntimeError(f"{INPUT_ERROR_MARK}{path}: {len(data)} bytes, {self.nbytes[i]} when it was "
                               f"converted: the folder changed since; run `{CONVERT_HINT} --overwrite`")
        return np.frombuffer(data, dtype=np.uint8)


class TrainSource:
    """DALI's external_source callback, run in its Python workers: batch `info.iteration` of the
    stream of this rank's batches that starts at batch `start_batch` of epoch `first_epoch` and runs
    on through the following epochs. Stateless but for a cache: any worker computes any batch."""

    def __init__(self, files: _Files, indices: list[int], specs: tuple[ViewSpec, ViewSpec], *,
                 batch_size: int, world_size: int, rank: int, seed: int, first_epoch: int,
                 start_batch: int, steps: int):
        self.files, self.indices, self.specs = files, np.asarray(indices, dtype=np.int64), specs
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.first_epoch, self.start_batch, self.steps = first_epoch, start_batch, steps
        self._order: dict[int, list[list[int]]] = {}

    def position(self, iteration: int) -> tuple[int, int]:
        """(epoch, batch) of the stream's `iteration`-th batch."""
        at = self.start_batch + iteration
        return self.first_epoch + at // self.steps, at % self.steps

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        if epoch not in self._order:  # keep two epochs: look-ahead crosses into the next one
            self._order = {e: order for e, order in self._order.items() if e == epoch - 1}
            self._order[epoch] = epoch_batches(len(self.indices), self.batch_size, self.world_size,
                                               self.rank, self.seed, epoch)
        return self.indices[self._order[epoch][batch]]

    def __call__(self, info):
        epoch, batch = self.position(info.iteration)
        index = self.batch_indices(epoch, batch)
        heights, widths = self.files.heights[index], self.files.widths[index]
        outputs = [[self.files.read(i) for i in index]]
        for view, spec in enumerate(self.specs):
            params = sample_view_params(self.seed, epoch, index, view, spec, heights, widths)
            crop = params.crop.numpy().astype(np.int32)  # top, left, height, width
            outputs += [crop[:, :2].copy(), crop[:, 2:].copy(), params.flip.numpy().astype(np.int32), pack_params(params)]
        return (*outputs, self.files.labels[index], index)


def eval_geometry(heights: np.ndarray, widths: np.ndarray, size: int, small: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The reference's evaluation crop as (resized (h, w) float32, crop origin (top, left) int32),
    (n, 2) each: small images resized to size x size; others resized (shorter side to 256/224 of the size,
    the longer one floored as torchvision computes it) and centre-cropped."""
    n = len(heights)
    if small:
        return np.full((n, 2), size, np.float32), np.zeros((n, 2), np.int32)
    short = round(size * 256 / 224)
    tall = heights > widths
    long_side = np.floor(short * np.maximum(heights, widths) / np.minimum(heights, widths))
    new_h = np.where(tall, long_side, short)
    new_w = np.where(tall, short, long_side)
    # torchvision's center_crop: int(round((H - size) / 2.0)), Python's round (half to even)
    top, left = np.round((new_h - size) / 2.0), np.round((new_w - size) / 2.0)
    return np.stack([new_h, new_w], 1).astype(np.float32), np.stack([top, left], 1).astype(np.int32)


class EvalSource:
    """external_source callback of the evaluation pipeline: batch `iteration mod len(batches)`."""

    def __init__(self, files: _Files, batches: list[list[int]], size: int, small: bool):
        self.files, self.batches, self.size, self.small = files, batches, size, small

    def __call__(self, info):
        index = np.asarray(self.batches[info.iteration % len(self.batches)], dtype=np.int64)
        resized, origin = eval_geometry(self.files.heights[index], self.files.widths[index], self.size,
                                        self.small)
        return [self.files.read(i) for i in index], resized, origin, self.files.labels[index], index


# ---- The pipelines -----------------------------------------------------------------------------------

def _decode(fn, types, encoded, gpu: bool, hw_decoder_load: float):
    """The one decode of each image: upright (EXIF applied), RGB, HWC uint8."""
    if gpu:
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                 hw_decoder_load=hw_decoder_load)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


def gpu_index(device: torch.device) -> int:
    """The CUDA device number DALI should use: the device's, else torch's current one."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _pipeline_settings(batch_size: int, workers: int, device: torch.device) -> dict:
    """Pipeline constructor arguments: GPU or CPU graph; Python workers when workers > 0, else the
    callback runs in this process (tiny data, tests)."""
    cores = len(os.sched_getaffinity(0))
    return dict(batch_size=batch_size, num_threads=max(1, min(cores, 8)),
                device_id=gpu_index(device) if device.type == "cuda" else None,
                py_num_workers=max(1, workers), py_start_method="spawn", exec_dynamic=True,
                prefetch_queue_depth=2)


def _source_settings(workers: int) -> dict:
    """external_source arguments: a batch callback, in `workers` processes that keep as many batches
    in flight (0: in this process, when the pipeline runs)."""
    parallel = dict(parallel=True, prefetch_queue_depth=max(2, workers)) if workers > 0 else {}
    return dict(batch=True, batch_info=True, **parallel)


def train_pipeline(source: TrainSource, *, batch_size: int, workers: int, device: torch.device,
                   hw_decoder_load: float):
    """The training graph: one decode; per view, its crop boxes cut out, resized, flipped. Outputs:
    view 1, view 2 (uint8 NHWC), the packed params of each view, labels, dataset indices."""
    fn, types, pipeline_def = import_dali()
    gpu = device.type == "cuda"

    @pipeline_def(**_pipeline_settings(batch_size, workers, device))
    def byol_views():
        encoded, *per_view, labels, index = fn.external_source(
            source, num_outputs=11, **_source_settings(workers))
        images = _decode(fn, types, encoded, gpu, hw_decoder_load)
        views, params = [], []
        for view, spec in enumerate(source.specs):
            origin, extent, flip, packed = per_view[4 * view:4 * view + 4]
            # The crop box cut out exactly, then resized: resize's own ROI would let its filter
            # reach past the box, which torchvision's crop-then-resize never sees (on CIFAR-10 that
            # doubles the mean abs difference to crop_and_flip: 0.50 instead of 0.23)
            crop = fn.slice(images, start=origin, shape=extent, axis_names="HW")
            crop = fn.resize(crop, size=(spec.size, spec.size), interp_type=types.INTERP_CUBIC,
                             antialias=True)
            views.append(fn.flip(crop, horizontal=flip))
            params.append(packed)
        return (*views, *params, labels, index)

    return byol_views()


def eval_pipeline(source: EvalSource, *, batch_size: int, workers: int, device: torch.device,
                  hw_decoder_load: float):
    """The evaluation graph: one decode, a resize to the reference's size, the centre crop."""
    fn, types, pipeline_def = import_dali()

    @pipeline_def(**_pipeline_settings(batch_size, workers, device))
    def centre_crops():
        encoded, resized, origin, labels, index = fn.external_source(
            source, num_outputs=5, **_source_settings(workers))
        images = _decode(fn, types, encoded, device.type == "cuda", hw_decoder_load)
        images = fn.resize(images, size=resized, interp_type=types.INTERP_CUBIC, antialias=True)
        crops = fn.slice(images, start=origin, shape=(source.size, source.size), axis_names="HW")
        return crops, labels, index

    return centre_crops()


def decoders_in(pipe) -> int:
    """How many decoder ops a built pipeline's graph holds."""
    return pipe.serialize().count(DECODER_OP.encode())


def first_undecodable(paths: list[str]) -> tuple[str, str] | None:
    """(path, DALI's message) of the first file DALI's CPU decoder rejects, or None. One file per
    run, so the failing run names the file (a failed pipeline names no sample)."""
    fn, types, pipeline_def = import_dali()
    files = iter(paths)
    current = []

    def one_file():
        current[:] = [next(files)]
        return [np.fromfile(current[0], dtype=np.uint8)]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_pipelined=False, exec_async=False,
                  exec_dynamic=False, prefetch_queue_depth=1)
    def probe():
        return fn.decoders.image(fn.external_source(one_file, batch=True), device="cpu",
                                 output_type=types.RGB)

    pipe = probe()
    pipe.build()
    for _ in paths:
        try:
            pipe.run()
        except StopIteration:
            return None
        except Exception as err:  # DALI raises RuntimeError; any failure here names this file
            return current[0], _dali_reason(err)
    return None


def _dali_reason(err: Exception) -> str:
    """The line of a DALI error that says what went wrong (after 'encountered:')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "encountered:" in lines:
        return lines[lines.index("encountered:") + 1]
    return lines[-1] if lines else type(err).__name__


def _input_error(err: Exception) -> InputError | None:
    """A worker's bad-input message, raised in the main process as an InputError."""
    for line in str(err).splitlines():
        if INPUT_ERROR_MARK in line:
            return InputError(line.split(INPUT_ERROR_MARK, 1)[1])
    return None


# ---- The loaders ---------------------------------------------------------------------------------------

def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if device.type == "cpu":
        _warn_cpu_graph()
    return device


@functools.cache
def _warn_cpu_graph() -> None:  # once per process, not once per loader
    log.warning("--loader dali without CUDA: DALI runs its CPU graph (decoding on the CPU), a "
                "reference path far slower than the GPU's")


def _to_torch(output, device: torch.device) -> torch.Tensor:
    """A DALI output batch as a torch tensor on `device`, sharing DALI's memory (DLPack; the dynamic
    executor hands each batch its own buffers, so no later run overwrites them)."""
    tensor = output.as_tensor()
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.from_dlpack(tensor)
    return torch.from_dlpack(tensor)


class _DaliLoaderBase:
    """What the training and evaluation loaders share: the data, the device, the pipeline's life."""

    def __init__(self, root, split: str, *, workers: int, device, dtype, hw_decoder_load: float):
        import_dali()  # fail now, in one line, when DALI is missing
        if not 0.0 <= hw_decoder_load <= 1.0:
            raise InputError(f"--hw-decoder-load {hw_decoder_load}: must be within 0..1")
        self.root, self.split = Path(root), split
        data, self.classes = open_split(root, split)
        self.files = _Files(data)
        self.workers, self.hw_decoder_load = workers, hw_decoder_load
        self.device = _resolve_device(device)
        self.dtype = dtype or view_dtype("bf16", self.device)
        self.bad_files: Counter[str] = Counter()  # DALI cannot skip a file: a bad one stops the run
        self._pipe, self._next = None, None  # the built pipeline, and the batch it yields next

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dataset_size(self) -> int:
        return len(self.files)

    def _run(self, candidates: list[np.ndarray]):
        """One pipeline run; DALI's and the workers' errors about a file raised as InputErrors that
        name it. `candidates`: the batches this run and the prefetched runs may hold."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            return self._pipe.run(stream) if stream is not None else self._pipe.run()
        except Exception as err:
            self._pipe, self._next = None, None  # a failed pipeline is no longer valid
            bad_input = _input_error(err)
            if bad_input is not None:
                raise bad_input from None
            if "decoders.image" not in str(err):
                raise
            paths = [self.files.path(int(i)) for batch in candidates for i in batch]
            found = first_undecodable(paths)
            if found is None:
                raise InputError(f"DALI's decoder failed on one of {len(paths)} files ({paths[0]}, ...): "
                                 f"{_dali_reason(err)}; DALI cannot skip a file (NVIDIA/DALI#3913): "
                                 f"convert the source folder again, `{CONVERT_HINT}`") from None
            path, reason = found
            raise InputError(f"{path}: DALI cannot decode it ({reason}) and cannot skip a file "
                             f"(NVIDIA/DALI#3913): convert the source folder again with `{CONVERT_HINT}`, "
                             "which repairs or leaves out such files") from None

    def _lookahead(self) -> int:
        """How many batches past the current one may be in flight (pipeline and worker queues)."""
        return 2 + max(2, self.workers)


class DaliLoader(_DaliLoaderBase):
    """BYOL training views through DALI from a converter output (`root`: OUT of `python -m
    fastbyol.convert DIR --to dali`). `epoch(e, start_batch)` yields this rank's `Views`; len() is the
    number of batches per epoch. `workers`: DALI's Python workers that read files and draw params (0:
    in this process). `hw_decoder_load`: the share of images for the GPU's hardware JPEG decoder."""

    def __init__(self, root, split: str = "train", *, batch_size: int, image_size: int = 224,
                 small: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0,
                 device="cpu", dtype: torch.dtype | None = None, crop_scale=(0.08, 1.0), subset: int = 0,
                 hw_decoder_load: float = 0.65):
        super().__init__(root, split, workers=workers, device=device, dtype=dtype,
                         hw_decoder_load=hw_decoder_load)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.specs = byol_view_specs(image_size, small=small, scale=crop_scale)
        self.indices = training_indices(len(self.files), subset, seed, batch_size, world_size,
                                        f"{self.root} ({split})")

    def __len__(self) -> int:
        return len(self.indices) // (self.batch_size * self.world_size)

    def _source(self, first_epoch: int, start_batch: int) -> TrainSource:
        return TrainSource(self.files, self.indices, self.specs, batch_size=self.batch_size,
                           world_size=self.world_size, rank=self.rank, seed=self.seed,
                           first_epoch=first_epoch, start_batch=start_batch, steps=len(self))

    def pipeline(self, epoch: int, start_batch: int = 0):
        """The built pipeline whose next batch is (epoch, start_batch): the running one when it is
        there already (the next epoch follows on with no rebuild), else a new one."""
        if self._pipe is None or self._next != (epoch, start_batch):
            self._pipe = None  # let the old one's workers go first
            self._pipe = train_pipeline(self._source(epoch, start_batch), batch_size=self.batch_size,
                                        workers=self.workers, device=self.device,
                                        hw_decoder_load=self.hw_decoder_load)
            self._pipe.build()
            self._next = (epoch, start_batch)
        return self._pipe

    def geometric_batches(self, epoch: int, start_batch: int = 0
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor, ViewParams, ViewParams,
                                              torch.Tensor, torch.Tensor]]:
        """(view 1, view 2, params 1, params 2, labels, index) per batch, before the photometric
        stage: uint8 (N, 3, S, S) channels_last views on the device (DALI's memory), CPU params,
        labels and indices."""
        self.pipeline(epoch, start_batch)  # built, its next batch (epoch, start_batch)
        order = self._source(epoch, 0)
        for batch in range(start_batch, len(self)):
            ahead = [order.batch_indices(*order.position(batch + k)) for k in range(self._lookahead())]
            v1, v2, p1, p2, labels, index = self._run(ahead)
            # the state is the batch after this one before the consumer sees it: a consumer that
            # stops here finds the pipeline positioned exactly there
            self._next = (epoch, batch + 1) if batch + 1 < len(self) else (epoch + 1, 0)
            index = _to_torch(index, torch.device("cpu"))
            if not np.array_equal(index.numpy(), ahead[0]):
                raise RuntimeError(f"DALI yielded batch {index[:4].tolist()}... where batch {batch} of "
                                   f"epoch {epoch} was due (a pipeline out of step)")
            views = [_to_torch(v, self.device).permute(0, 3, 1, 2) for v in (v1, v2)]
            params = [unpack_params(_to_torch(p, torch.device("cpu"))) for p in (p1, p2)]
            yield (*views, *params, _to_torch(labels, torch.device("cpu")), index)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Views]:
        """This rank's batches of epoch `epoch` from batch `start_batch` on: a resumed run sees the
        same batches and views as an uninterrupted one."""
        for v1, v2, p1, p2, labels, index in self.geometric_batches(epoch, start_batch):
            yield Views(photometric(v1, p1, self.specs[0], self.dtype),
                        photometric(v2, p2, self.specs[1], self.dtype),
                        labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True))


class DaliEvalLoader(_DaliLoaderBase):
    """Deterministic evaluation crops through DALI (the reference's centre crop), iterated as
    (images, labels, index) batches, normalized, on the device. `max_samples` keeps a random subset
    keyed by `seed`; under world_size > 1 each rank reads a disjoint contiguous slice of it."""

    def __init__(self, root, split: str = "val", *, image_size: int, batch_size: int, small: bool = False,
                 workers: int = 0, device="cpu", rank: int = 0, world_size: int = 1,
                 max_samples: int | None = None, seed: int = 0, dtype: torch.dtype | None = None,
                 hw_decoder_load: float = 0.65):
        super().__init__(root, split, workers=workers, device=device, dtype=dtype,
                         hw_decoder_load=hw_decoder_load)
        self.image_size, self.batch_size, self.small = image_size, batch_size, small
        self.indices = eval_indices(len(self.files), max_samples, seed, rank, world_size)
        self.batches = [self.indices[k:k + batch_size] for k in range(0, len(self.indices), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not self.batches:
            return
        if self._pipe is None or self._next != 0:
            self._pipe = None
            source = EvalSource(self.files, self.batches, self.image_size, self.small)
            self._pipe = eval_pipeline(source, batch_size=self.batch_size, workers=self.workers,
                                       device=self.device, hw_decoder_load=self.hw_decoder_load)
            self._pipe.build()
        for k in range(len(self)):
            ahead = [np.asarray(self.batches[(k + j) % len(self)]) for j in range(self._lookahead())]
            crops, labels, index = self._run(ahead)
            self._next = (k + 1) % len(self)
            images = normalize(_to_torch(crops, self.device).permute(0, 3, 1, 2), self.dtype)
            yield (images, _to_torch(labels, torch.device("cpu")).to(self.device, non_blocking=True),
                   _to_torch(index, torch.device("cpu")).to(self.device, non_blocking=True))
