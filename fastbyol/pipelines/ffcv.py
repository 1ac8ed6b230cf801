"""The FFCV loader: BYOL views from a .beton written by `python -m fastbyol.convert DIR --to ffcv`
(fields `image`: JPEG bytes with width and height, `label`), in `epoch_batches` order with
`sample_view_params`' parameters, like every loader.

Each image is decoded once. `ffcv_decode="cpu"`: FFCV's numba-compiled threads read the .beton and
decode with libjpeg-turbo (FFCV's `imdecode`, its fast IDCT); then, by `crop_on`,
  "device"  the decoded images, packed back to back, travel to the device, where `crop_resize` makes
            both views (design (a));
  "cpu"     both crops are resized (PIL's antialiased bicubic, fixed point) in the same numba loop,
            and only the two S x S views travel (design (b)).
`ffcv_decode="gpu"`: the .beton supplies the JPEG bytes only; `torchvision.io.decode_jpeg(list,
device=...)` decodes the batch (nvJPEG on a GPU; the same code on the CPU), then `crop_resize`.
Either way the colour stage is `photometric`, on the device. benchmarks/ffcv.md compares the designs.

FFCV takes our order as an instance of a TraversalOrder subclass (`_GivenOrder`). Its Loader is made
once per process for each set of its settings (`_ffcv_loader`), so numba compiles each pipeline once.
The crop boxes of design (b) reach the compiled loop through the image field's metadata, to which
per-epoch columns are added: the one per-batch input FFCV passes into its compiled code, and never
frozen into it.

FFCV's own Reader trusts the file: a truncated or foreign file surfaces later as a numba KeyError, a
garbage shape or a crash inside a compiled loop. `open_beton` checks the header, the field
descriptors, the metadata and the allocation table against the file's size first, and names what is
wrong in one InputError. Every entry point here opens files through it.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fastbyol import InputError
from fastbyol.kernels.augment import normalize, photometric
from fastbyol.kernels.crop_resize import PackedImages
from fastbyol.pipelines.prefetch import crop_views, make_view_job, prefetch, to_device
from fastbyol.pipelines.torchvision import eval_crop
from fastbyol.views import (Views, byol_view_specs, epoch_batches, eval_indices, sample_view_params,
                            training_indices, view_dtype)

log = logging.getLogger(__name__)

STATUS_BYTES = 16  # spare bytes a row of the CPU-decode pipelines' output: room for the decode statuses
MAX_FIELDS = 64  # far above any real .beton; guards against reading a huge descriptor table from junk
CONVERT_HINT = "write it again with `python -m fastbyol.convert DIR --to ffcv`"
INSTALL_HINT = ("pip install 'fastbyol[ffcv]', which builds against the apt packages pkg-config "
                "libturbojpeg0-dev libopencv-dev")


def _ffcv():
    try:
        from ffcv import reader, types
        from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE
    except (ImportError, OSError) as err:
        raise InputError(f"reading .beton files needs FFCV, which does not import ({type(err).__name__}: "
                         f"{err}): {INSTALL_HINT}") from err
    return reader, types, MIN_PAGE_SIZE, MAX_PAGE_SIZE


def open_beton(path: str | os.PathLike):
    """FFCV's Reader for `path`, once the file is known to be a whole .beton. Raises InputError
    naming the file and what is wrong with it: missing, foreign (not a .beton), or truncated."""
    reader_module, types, min_page, max_page = _ffcv()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    foreign = f"{path}: not an FFCV .beton file"
    if size < types.HeaderType.itemsize:
        raise InputError(f"{foreign} ({size} bytes, shorter than a .beton header)")
    header = np.fromfile(path, dtype=types.HeaderType, count=1)[0]
    if header["version"] != types.CURRENT_VERSION:
        raise InputError(f"{foreign} (format version {header['version']}; FFCV 1.0.2 writes "
                         f"{types.CURRENT_VERSION})")
    page_size, fields = int(header["page_size"]), int(header["num_fields"])
    power_of_two = page_size & (page_size - 1) == 0
    if not (min_page <= page_size < max_page and power_of_two and 1 <= fields <= MAX_FIELDS):
        raise InputError(f"{foreign} (implausible header: {fields} fields, page size {page_size})")

    descriptors_end = types.HeaderType.itemsize + fields * types.FieldDescType.itemsize
    if descriptors_end > size:
        raise InputError(f"{path}: truncated .beton ({size} bytes, cut inside its field table); "
                         f"{CONVERT_HINT}")
    descriptors = np.fromfile(path, dtype=types.FieldDescType, count=fields, offset=types.HeaderType.itemsize)
    for descriptor in descriptors:
        if types.TYPE_ID_HANDLER.get(int(descriptor["type_id"])) is None:
            name = bytes(descriptor["name"]).rstrip(b"\0").decode("ascii", "replace")
            raise InputError(f"{path}: field {name!r} has type id {descriptor['type_id']}, which FFCV 1.0.2 "
                             "does not know (a custom field, or not a .beton)")
    handlers = types.get_handlers(descriptors)
    metadata_end = descriptors_end + int(header["num_samples"]) * types.get_metadata_type(handlers).itemsize
    table_start = int(header["alloc_table_ptr"])
    entry = types.ALLOC_TABLE_TYPE.itemsize
    if metadata_end > size or not metadata_end <= table_start <= size or (size - table_start) % entry:
        raise InputError(f"{path}: truncated .beton ({size:,} bytes; its header puts the end of its "
                         f"data at byte {table_start:,}); {CONVERT_HINT}")

    try:
        reader = reader_module.Reader(str(path))
    except Exception as err:  # anything FFCV trips over in a file that passed the checks above
        raise InputError(f"{foreign} ({type(err).__name__}: {err})") from err
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_start:
        raise InputError(f"{path}: damaged .beton (sample data runs past its allocation table); "
                         f"{CONVERT_HINT}")
    known = set(table["ptr"].tolist())
    for i, name in enumerate(reader.field_names):
        metadata = reader.metadata[f"f{i}"]  # FFCV's metadata columns are unnamed: f0, f1, ...
        if metadata.dtype.names and "data_ptr" in metadata.dtype.names:
            missing = np.flatnonzero(~np.isin(metadata["data_ptr"], list(known)))
            if missing.size:
                raise InputError(f"{path}: damaged .beton (the {name!r} data of sample {missing[0]} is not "
                                 f"in its allocation table); {CONVERT_HINT}")
    return reader


def read_image(reader, index: int, field: str = "image") -> np.ndarray:
    """Sample `index`'s image as uint8 (H, W, 3), decoded by FFCV's own decoder (libjpeg-turbo), one
    at a time and without a Loader: for images of any size, and with no numba compilation."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    meta = reader.metadata[f"f{reader.field_names.index(field)}"][index]
    height, width, pointer = int(meta["height"]), int(meta["width"]), int(meta["data_ptr"])
    table = reader.alloc_table
    nbytes = int(table["size"][np.flatnonzero(table["ptr"] == pointer)[0]])
    data = np.fromfile(reader.file_name, dtype=np.uint8, count=nbytes, offset=pointer)
    if meta["mode"] != IMAGE_MODES["jpg"]:
        return data.reshape(height, width, 3)
    image = np.empty((height, width, 3), np.uint8)
    if imdecode(data, image, height, width, height, width, 0, 0, 1, 1, False, False) != 0:
        raise InputError(f"{reader.file_name}: libjpeg-turbo reports an error in sample {index}'s {field!r}")
    return image


def constant_size_loader(path: str | os.PathLike, batch_size: int, workers: int = 1):
    """FFCV's Loader over a .beton whose images all share one size (CIFAR-like): yields
    (uint8 images (N, H, W, 3), int64 labels (N,)) numpy batches in file order. Each Loader compiles
    its pipeline with numba first (several seconds)."""
    open_beton(path)
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    return Loader(str(path), batch_size=batch_size, num_workers=workers, order=OrderOption.SEQUENTIAL,
                  pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]}, drop_last=False)


# ---- numba kernels --------------------------------------------------------------------------------
# Plain Python functions, compiled once per process by `_kernels(jit=True)` (the FFCV pipeline that
# calls them is compiled per FFCV Loader, but only its small per-batch loop). With FFCV's Compiler
# disabled they run as Python, which the decode-count test uses.

PRECISION_BITS = 22  # PIL's fixed-point resampling precision (32 - 8 - 2)


def _cubic(x):
    """PIL's bicubic filter (a = -0.5), which torchvision's antialiased bicubic resize uses too."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _resample_coefficients(in_size, out_size, cubic):
    """PIL's precompute_coeffs + normalize_coeffs_8bpc for one axis: per output pixel, the first input
    pixel, the number of taps and the fixed-point weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    inverse = 1.0 / filterscale
    taps = int(math.ceil(support)) * 2 + 1
    starts = np.empty(out_size, np.int64)
    counts = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.int64)
    kernel = np.empty(taps, np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward 0, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        total = 0.0
        for x in range(xmax):
            kernel[x] = cubic((x + xmin - center + 0.5) * inverse)
            total += kernel[x]
        for x in range(xmax):
            w = kernel[x] / total if total != 0.0 else 0.0
            weights[xx, x] = int(w * (1 << PRECISION_BITS) + (0.5 if w >= 0 else -0.5))
        starts[xx] = xmin
        counts[xx] = xmax
    return starts, counts, weights


def _clip8(value):
    return 0 if value < 0 else (255 if value > 255 else value)


@functools.cache
def _kernels(jit: bool):
    """The per-image kernels, numba-compiled (jit) or as Python."""
    from types import SimpleNamespace

    from ffcv.libffcv import imdecode
    if jit:
        import numba
        compile_ = numba.njit(nogil=True, cache=False)
    else:
        def compile_(fn):
            return fn
    imdecode_ = compile_(imdecode)
    cubic, clip8 = compile_(_cubic), compile_(_clip8)
    coefficients = compile_(_resample_coefficients)
    half, bits = 1 << (PRECISION_BITS - 1), PRECISION_BITS

    def decode(data, mode, height, width, hwc):
        """One image into hwc (flat uint8, >= H * W * 3) as H x W x 3 RGB; libjpeg-turbo's status."""
        if mode == 0:  # IMAGE_MODES["jpg"]
            return imdecode_(data, hwc, height, width, height, width, 0, 0, 1, 1, False, False)
        hwc[:height * width * 3] = data[:height * width * 3]
        return 0

    def to_chw(hwc, height, width, out):
        """H x W x 3 (flat) to 3 x H x W (flat, at the start of out)."""
        plane = height * width
        for p in range(plane):
            for c in range(3):
                out[c * plane + p] = hwc[p * 3 + c]

    def resize_view(hwc, width, top, left, box_height, box_width, flip, out):
        """One view: box (top, left, box_height, box_width) of an H x W x 3 image (flat, row length
        width), resized to out's S x S by PIL's antialiased bicubic (horizontal pass, uint8, then
        vertical), flipped if asked, into out (3, S, S). The sums stay within int32, as PIL's (the
        weights sum to 2**22, so 255 x their positive part stays below 2**31), and the vertical pass
        keeps its row of sums as int32; it runs along whole rows, which numba vectorizes (about 2.5x
        faster than a pixel at a time)."""
        size = out.shape[1]
        xs, xn, xw = coefficients(box_width, size, cubic)
        ys, yn, yw = coefficients(box_height, size, cubic)
        xw, yw = xw.astype(np.int32), yw.astype(np.int32)
        rows = np.empty((box_height, size * 3), np.uint8)
        for y in range(box_height):
            base = ((top + y) * width + left) * 3
            for xx in range(size):
                r, g, b = np.int32(half), np.int32(half), np.int32(half)
                p = base + xs[xx] * 3
                for k in range(xn[xx]):
                    w = xw[xx, k]
                    r += np.int32(hwc[p]) * w
                    g += np.int32(hwc[p + 1]) * w
                    b += np.int32(hwc[p + 2]) * w
                    p += 3
                rows[y, xx * 3] = clip8(r >> bits)
                rows[y, xx * 3 + 1] = clip8(g >> bits)
                rows[y, xx * 3 + 2] = clip8(b >> bits)
        sums = np.empty(size * 3, np.int32)
        for yy in range(size):
            sums[:] = half
            for k in range(yn[yy]):
                w, row = yw[yy, k], rows[ys[yy] + k]
                for j in range(size * 3):
                    sums[j] += np.int32(row[j]) * w
            for xx in range(size):
                ox = size - 1 - xx if flip else xx
                for c in range(3):
                    out[c, yy, ox] = clip8(sums[xx * 3 + c] >> bits)

    return SimpleNamespace(decode=compile_(decode), to_chw=compile_(to_chw),
                           resize_view=compile_(resize_view))


# ---- FFCV pieces ----------------------------------------------------------------------------------

VIEW_COLUMNS = tuple(f"{name}{view}" for view in (0, 1) for name in ("top", "left", "height", "width", "flip"))


@functools.cache
def _ffcv_classes():
    """(`ImageOp`, `GivenOrder`): subclasses of FFCV's, defined once FFCV imports."""
    try:
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.pipeline.allocation_query import AllocationQuery
        from ffcv.pipeline.compiler import Compiler
        from ffcv.traversal_order.base import TraversalOrder
    except (ImportError, OSError) as err:
        raise InputError(f"--loader ffcv needs FFCV, which does not import ({type(err).__name__}: {err}): "
                         f"{INSTALL_HINT}") from err
    from dataclasses import replace
    _fix_os_cache_reader()

    class ImageOp(SimpleRGBImageDecoder):  # FFCV takes an RGBImageField's decoder by this class
        """The image field's decoder, one decode per image. kind:
        "packed"  decoded 3 x H x W images back to back (batch row i holds no particular image);
        "views"   (n, 2, 3, S, S): both views, from the VIEW_COLUMNS of the field's metadata;
        "bytes"   the stored bytes, row i = image i (its length is the caller's)."""

        def __init__(self, kind: str, size: int = 0, max_bytes: int = 0):
            super().__init__()  # (SimpleRGBImageDecoder's own methods are all replaced below)
            self.kind, self.size, self.max_bytes = kind, size, max_bytes

        def declare_state_and_memory(self, previous_state):
            u8 = np.dtype("<u1")
            if self.kind == "bytes":
                shape = (self.max_bytes,)
            else:  # the payload, and STATUS_BYTES a row for the batch's decode statuses (below)
                pixels = int(self.metadata["height"].max()) * int(self.metadata["width"].max()) * 3
                shape = ((pixels if self.kind == "packed" else 2 * 3 * self.size * self.size) + STATUS_BYTES,)
            return replace(previous_state, jit_mode=True, shape=shape, dtype=u8), AllocationQuery(shape, u8)

        def generate_code(self):
            kernels = _kernels(Compiler.is_enabled)
            decode, to_chw, resize_view = kernels.decode, kernels.to_chw, kernels.resize_view
            mem_read, my_range = self.memory_read, Compiler.get_iterator()
            size = self.size

            def decode_sample(row, storage_state):
                """Sample `row`'s image into a new H x W x 3 buffer (flat), the decoding thread's own (a
                buffer per batch row would cost batch x the largest image); 1 if libjpeg-turbo failed."""
                height, width = np.int64(row["height"]), np.int64(row["width"])
                hwc = np.empty(height * width * 3, np.uint8)
                failed = decode(mem_read(row["data_ptr"], storage_state), row["mode"], height, width, hwc)
                return hwc, 1 if failed != 0 else 0

            decode_sample = Compiler.compile(decode_sample)

            # Both write their payload back to back from the start of the returned rows and sample i's
            # decode status in the i-th of the last n bytes, which the payload never reaches
            # (STATUS_BYTES >= 1 spare bytes a row).
            def packed(batch_indices, out, metadata, storage_state):
                flat = out.reshape(-1)
                n = len(batch_indices)
                status = flat[n * out.shape[1] - n:n * out.shape[1]]
                starts = np.zeros(n, np.int64)
                for i in range(1, n):
                    row = metadata[batch_indices[i - 1]]
                    starts[i] = starts[i - 1] + np.int64(row["height"]) * np.int64(row["width"]) * 3
                for i in my_range(n):
                    row = metadata[batch_indices[i]]
                    hwc, status[i] = decode_sample(row, storage_state)
                    height, width = np.int64(row["height"]), np.int64(row["width"])
                    to_chw(hwc, height, width, flat[starts[i]:starts[i] + height * width * 3])
                return out[:n]

            def views(batch_indices, out, metadata, storage_state):
                flat = out.reshape(-1)
                n = len(batch_indices)
                status = flat[n * out.shape[1] - n:n * out.shape[1]]
                both = 2 * 3 * size * size
                for i in my_range(n):
                    row = metadata[batch_indices[i]]
                    hwc, status[i] = decode_sample(row, storage_state)
                    pair = flat[i * both:(i + 1) * both].reshape((2, 3, size, size))
                    width = np.int64(row["width"])
                    resize_view(hwc, width, row["top0"], row["left0"], row["height0"], row["width0"],
                                row["flip0"], pair[0])
                    resize_view(hwc, width, row["top1"], row["left1"], row["height1"], row["width1"],
                                row["flip1"], pair[1])
                return out[:n]

            def raw_bytes(batch_indices, out, metadata, storage_state):
                n = len(batch_indices)
                for i in my_range(n):
                    data = mem_read(metadata[batch_indices[i]]["data_ptr"], storage_state)
                    out[i, :len(data)] = data
                return out[:n]

            code = dict(packed=packed, views=views, bytes=raw_bytes)[self.kind]
            code.is_parallel = True
            return code

    class GivenOrder(TraversalOrder):
        """Our order, as FFCV 1.0.2 takes one: an instance whose call with the Loader returns it.
        `order` is set before each epoch (dataset indices, this rank's batches back to back)."""

        def __init__(self, order: np.ndarray):
            self.order = order

        def __call__(self, loader):
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.order

    return ImageOp, GivenOrder


def _fix_os_cache_reader() -> None:
    """FFCV 1.0.2's OSCacheManager types its memory map by setting `mutable = False` on numba's shared
    `uint8[::1]` type object. That changes the hash of a type numba already uses as a key (in every
    dispatcher's table of compiled signatures), so the next pipeline compiled in the process dies in
    numba with a KeyError. Its reader is compiled here with a read-only array type of its own."""
    import numba as nb
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline.compiler import Compiler
    if getattr(OSCacheManager, "fastbyol_fixed", False):
        return
    read_only = nb.types.Array(nb.types.uint8, 1, "C", readonly=True)

    def state_type(self):
        return nb.types.Tuple([read_only, nb.uint64[::1], nb.uint64[::1]])

    def compile_reader(self):
        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]
        return Compiler.compile(read, read_only(nb.uint64, state_type(self)))

    OSCacheManager.state_type = property(state_type)
    OSCacheManager.compile_reader = compile_reader
    OSCacheManager.fastbyol_fixed = True


class _Pipeline:
    """One FFCV Loader (image field by `kind`, label as int64) and its order; made once per process for
    each set of settings (`_pipeline`), because numba compiles each new Loader's code."""

    def __init__(self, path: Path, kind: str, batch_size: int, workers: int, os_cache: bool, size: int,
                 max_bytes: int):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        ImageOp, GivenOrder = _ffcv_classes()
        self.order = GivenOrder(np.arange(batch_size, dtype=np.uint64))
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=workers, os_cache=os_cache,
                             order=self.order, distributed=False, drop_last=False, batches_ahead=2,
                             pipelines={"image": [ImageOp(kind, size, max_bytes)], "label": [IntDecoder()]})
        self.metadata = self.loader.reader.metadata  # FFCV's own, before any columns are added
        self.path, self.kind, self.size = path, kind, size
        self.compiled = False
        self.what = f"{path.name} ({kind}, batch {batch_size}, {workers} threads)"

    def run(self, order: np.ndarray, epoch: int = 0, metadata: np.ndarray | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (images, labels (n,)) per batch of `order`, images by kind: "packed" the flat decoded
        images back to back, "views" (n, 2, 3, S, S), "bytes" (n, max_bytes). FFCV's buffers, valid
        until the next batch is asked for. A sample whose JPEG data libjpeg-turbo cannot decode (a
        .beton damaged after conversion: the converter decoded every file) raises InputError."""
        loader = self.loader
        self.order.order = order.astype(np.uint64)
        loader.first_traversal_order = self.order.order  # FFCV's len(): this epoch's, not epoch 0's
        loader.next_epoch = epoch
        loader.reader.metadata = self.metadata if metadata is None else metadata
        batches = iter(loader)
        try:
            start, done = time.perf_counter(), 0
            while (batch := _next_batch(batches)) is not None:
                if not self.compiled:
                    self.compiled = True
                    log.info("FFCV pipeline %s: numba compiled it and decoded the first batch in %.1f s "
                             "(once per process)", self.what, time.perf_counter() - start)
                images, labels = batch
                n = len(labels)
                if self.kind != "bytes":
                    flat = images.reshape(-1)
                    failed = np.flatnonzero(flat[len(flat) - n:])
                    if failed.size:
                        raise InputError(f"{self.path}: sample {order[done + failed[0]]}'s JPEG data does not "
                                         f"decode (libjpeg-turbo reports an error; {failed.size} of this batch's "
                                         f"{n}): the file is damaged; {CONVERT_HINT}")
                    images = flat if self.kind == "packed" else flat[:n * 2 * 3 * self.size ** 2].reshape(
                        n, 2, 3, self.size, self.size)
                done += n
                yield images, labels.reshape(-1)
        finally:
            batches.close()


def _next_batch(batches):
    """FFCV's EpochIterator.__next__, except that a loading thread that died (its traceback printed)
    raises here instead of leaving the caller waiting forever. None at the end of the epoch."""
    while True:
        try:
            item = batches.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not batches.is_alive():
                raise RuntimeError(f"FFCV's loading thread for {batches.loader.fname} died (its error is "
                                   "printed above)") from None
    if item is None:
        batches.close()
        return None
    slot, result = item
    if torch.cuda.is_available():  # as FFCV does: wait for the batch's copies on its stream
        batches.current_stream.wait_stream(batches.cuda_streams[slot])
    return result


_PIPELINES: dict[tuple, _Pipeline] = {}


def _pipeline(path: Path, kind: str, batch_size: int, workers: int, os_cache: bool, size: int = 0,
              max_bytes: int = 0) -> _Pipeline:
    """The process's pipeline for these settings (training and evaluation loaders share one)."""
    workers, size = max(1, workers), size if kind == "views" else 0
    key = (str(path.resolve()), kind, batch_size, workers, os_cache, size, max_bytes)
    if key not in _PIPELINES:
        _PIPELINES[key] = _Pipeline(path, kind, batch_size, workers, os_cache, size, max_bytes)
    return _PIPELINES[key]


# ---- The loaders ----------------------------------------------------------------------------------

def beton_path(root: str | os.PathLike, split: str) -> Path:
    """root/<split>.beton (the converter's output folder), or root itself for 'train' if it is a .beton."""
    root = Path(root)
    if root.suffix == ".beton" and split == "train":
        return root
    path = root / f"{split}.beton"
    if not path.is_file():
        raise InputError(f"{path}: no such file (--loader ffcv reads the output folder of "
                         f"`python -m fastbyol.convert DIR --to ffcv`)")
    return path


def native_side(root: str | os.PathLike) -> int:
    """The largest side among the train .beton's images (from its metadata: nothing is decoded)."""
    reader = open_beton(beton_path(root, "train"))
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    return int(max(meta["height"].max(), meta["width"].max()))


class _BetonLoader:
    """What the training and evaluation loaders share: the .beton, its image sizes and stored byte
    counts, the classes, the device and the decode mode."""

    def __init__(self, root, split: str, workers: int, device, dtype, ffcv_decode: str, os_cache: bool):
        if ffcv_decode not in ("cpu", "gpu"):
            raise InputError(f"--ffcv-decode {ffcv_decode}: choose cpu or gpu")
        self.path = beton_path(root, split)
        reader = open_beton(self.path)
        if reader.field_names[:2] != ["image", "label"]:
            raise InputError(f"{self.path}: fields {reader.field_names}, expected image and label ({CONVERT_HINT})")
        image = reader.metadata["f0"]
        self.heights = torch.from_numpy(image["height"].astype(np.int64))
        self.widths = torch.from_numpy(image["width"].astype(np.int64))
        table = reader.alloc_table
        sizes = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
        self.nbytes = np.array([sizes[p] for p in image["data_ptr"].tolist()], np.int64)
        if ffcv_decode == "gpu" and (image["mode"] != 0).any():
            raise InputError(f"{self.path}: --ffcv-decode gpu needs JPEG images, and some are stored as raw "
                             f"pixels ({CONVERT_HINT})")
        classes = Path(root) / "classes.json"
        labels = reader.metadata["f1"]
        self.num_classes = (len(json.loads(classes.read_text())) if classes.is_file()
                            else int(labels.max()) + 1 if len(labels) else 0)
        self.dataset_size = len(image)
        self.workers, self.os_cache, self.ffcv_decode = workers, os_cache, ffcv_decode
        self.device = torch.device(device)
        self.dtype = dtype or view_dtype("bf16", self.device)
        self.bad_files: Counter[str] = Counter()  # the converter has excluded them already

    def _images(self, images: np.ndarray, index: np.ndarray) -> PackedImages:
        """The batch's decoded images from a "packed" pipeline's output (on the host, in FFCV's buffer),
        or decoded here from a "bytes" pipeline's output (on the device)."""
        heights, widths = self.heights[index], self.widths[index]
        if self.kind == "packed":
            numel = 3 * heights * widths
            data = torch.from_numpy(images.reshape(-1)[:int(numel.sum())])
            return PackedImages(data, torch.cumsum(numel, 0) - numel, heights, widths)
        import torchvision.io  # looked up at each call: the decode-count test wraps decode_jpeg
        encoded = [torch.from_numpy(images[i, :n]) for i, n in enumerate(self.nbytes[index].tolist())]
        try:
            decoded = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=self.device)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:  # bad data, or the device failing: a bad sample is named, else re-raised
            sample = self._first_undecodable(encoded, index)
            if sample is None:
                raise
            raise InputError(f"{self.path}: sample {sample}'s JPEG data does not decode: the file is damaged; "
                             f"{CONVERT_HINT}") from err
        # Offsets and sizes stay host tensors, known from the metadata: the prefetcher carries them in
        # its one pinned copy (pack_images would copy them from pageable memory: a host sync per batch).
        numel = 3 * heights * widths
        return PackedImages(torch.cat([image.reshape(-1) for image in decoded]),
                            torch.cumsum(numel, 0) - numel, heights, widths)

    def _first_undecodable(self, encoded: list[torch.Tensor], index: np.ndarray) -> int | None:
        """The dataset index of the first sample whose bytes do not decode on their own, on the CPU (a
        device in an error state would fail them all), or None."""
        import torchvision.io
        for data, sample in zip(encoded, index.tolist()):
            try:
                torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB)
            except RuntimeError:
                return sample
        return None


class FfcvLoader(_BetonLoader):
    """BYOL training views from `root`/<split>.beton (see the module docstring). `epoch(e)` yields this
    rank's `Views`; len() is the number of batches per epoch, the same on every rank. `crop_on`:
    "device" (design (a)) or "cpu" (design (b)), for ffcv_decode="cpu"."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, batch_size: int,
                 image_size: int = 224, small: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 0, device: str | torch.device = "cpu",
                 crop_scale: tuple[float, float] = (0.08, 1.0), subset: int = 0,
                 dtype: torch.dtype | None = None, ffcv_decode: str = "cpu", os_cache: bool = False,
                 crop_on: str = "device"):
        if crop_on not in ("device", "cpu"):
            raise ValueError(f"crop_on={crop_on!r}: expected 'device' or 'cpu'")
        if crop_on == "cpu" and ffcv_decode == "gpu":
            raise ValueError("crop_on='cpu' crops in FFCV's threads after their decode; with ffcv_decode='gpu' "
                             "the images are decoded on the device, so they are cropped there")
        super().__init__(root, split, workers, device, dtype, ffcv_decode, os_cache)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.specs = byol_view_specs(image_size, small=small, scale=crop_scale)
        self.indices = training_indices(self.dataset_size, subset, seed, batch_size, world_size,
                                        str(self.path))
        self.kind = "bytes" if ffcv_decode == "gpu" else "views" if crop_on == "cpu" else "packed"
        self.pipeline = _pipeline(self.path, self.kind, batch_size, workers, os_cache, image_size,
                                  int(self.nbytes.max()) if self.kind == "bytes" else 0)

    def __len__(self) -> int:
        return len(self.indices) // (self.batch_size * self.world_size)

    def _with_boxes(self, index: np.ndarray, params) -> np.ndarray:
        """FFCV's metadata with each sample's two crop boxes and flips added to the image field, for
        the "views" pipeline (samples outside this epoch keep zeros: never read)."""
        base = self.pipeline.metadata
        image_dtype = base.dtype["f0"]
        fields = [(name, image_dtype.fields[name][0]) for name in image_dtype.names]
        columns = np.dtype(fields + [(name, "<i8") for name in VIEW_COLUMNS])
        metadata = np.zeros(len(base), np.dtype([("f0", columns), ("f1", base.dtype["f1"])]))
        for name in image_dtype.names:
            metadata["f0"][name] = base["f0"][name]
        metadata["f1"] = base["f1"]
        for view, p in enumerate(params):
            for name, values in zip(("top", "left", "height", "width"), p.crop.unbind(1)):
                metadata["f0"][f"{name}{view}"][index] = values.numpy()
            metadata["f0"][f"flip{view}"][index] = p.flip.numpy()
        return metadata

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Views]:
        """This rank's batches of epoch `epoch`, from batch `start_batch` on (skipped batches are never
        read, so a resumed run continues exactly)."""
        yield from prefetch(self.host_jobs(epoch, start_batch), self._engine, self.device)

    def host_jobs(self, epoch: int, start_batch: int = 0) -> Iterator:
        """The batch jobs `epoch` hands to the prefetcher: what the host side makes (FFCV's threads, the
        parameters), before any copy to the device. Each job's image tensors are views into FFCV's
        buffers, valid until the next job is asked for. `bench loader --host-only` times these."""
        positions = epoch_batches(len(self.indices), self.batch_size, self.world_size, self.rank,
                                  self.seed, epoch)[start_batch:]
        if not positions:
            return
        order = np.asarray(self.indices, np.int64)[np.asarray(positions)].reshape(-1)
        heights, widths = self.heights[order], self.widths[order]
        params = [sample_view_params(self.seed, epoch, order, view, spec, heights, widths)
                  for view, spec in enumerate(self.specs)]
        metadata = self._with_boxes(order, params) if self.kind == "views" else None
        for k, (images, labels) in enumerate(self.pipeline.run(order, epoch, metadata)):
            rows = slice(k * self.batch_size, (k + 1) * self.batch_size)
            index = order[rows]
            pair = tuple(type(p)(*(field[rows] for field in p)) for p in params)
            # labels: a copy, as FFCV reuses its buffers
            labels, index = torch.tensor(labels, dtype=torch.int64), torch.from_numpy(index)
            if self.kind == "views":
                yield torch.from_numpy(images), pair, labels, index
            elif self.kind == "packed":
                yield make_view_job(self._images(images, index.numpy()), pair, labels, index)
            else:  # decoded here, on the device, on this stream: the engine's stream waits for it
                decoded = self._images(images, index.numpy())
                ready = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
                yield make_view_job(decoded, pair, labels, index), ready

    def _engine(self, job) -> Views:
        """Views from one batch's job on the device: crop_resize (unless the views came cropped) and
        photometric."""
        if self.kind == "bytes":
            job, ready = job
            if ready is not None:  # the prefetcher's side stream, after the decode on the main one
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(ready)
                job.images.data.record_stream(stream)
        if self.kind != "views":
            return crop_views(job, self.specs, self.dtype)
        both, pair, labels, index = job
        v1, v2 = (photometric(both[:, view], p, spec, self.dtype)
                  for view, (p, spec) in enumerate(zip(pair, self.specs)))
        return Views(v1, v2, labels, index)


class FfcvEvalLoader(_BetonLoader):
    """Deterministic evaluation crops (the reference loader's: bicubic resize to S for small images,
    else shorter side to S * 256 / 224 and a centre S x S crop), as (images, labels, index) batches,
    normalized, on the device. `max_samples` keeps a random subset keyed by `seed`; under world_size > 1
    each rank reads a disjoint contiguous slice of it."""

    def __init__(self, root: str | os.PathLike, split: str = "val", *, image_size: int, batch_size: int,
                 small: bool = False, workers: int = 0, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, max_samples: int | None = None, seed: int = 0,
                 dtype: torch.dtype | None = None, ffcv_decode: str = "cpu", os_cache: bool = False):
        super().__init__(root, split, workers, device, dtype, ffcv_decode, os_cache)
        self.image_size, self.small, self.batch_size = image_size, small, batch_size
        self.indices = eval_indices(self.dataset_size, max_samples, seed, rank, world_size)
        self.kind = "bytes" if ffcv_decode == "gpu" else "packed"
        self.pipeline = _pipeline(self.path, self.kind, batch_size, workers, os_cache, 0,
                                  int(self.nbytes.max()) if self.kind == "bytes" else 0)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = np.asarray(self.indices, np.int64)
        for k, (images, labels) in enumerate(self.pipeline.run(order)):
            index = torch.from_numpy(order[k * self.batch_size:(k + 1) * self.batch_size])
            job = self._images(images, index.numpy()), torch.tensor(labels, dtype=torch.int64), index
            packed, labels, index = to_device(job, self.device)
            crops = torch.stack([eval_crop(packed.image(i), self.image_size, self.small)
                                 for i in range(len(index))])
            yield normalize(crops, self.dtype), labels, index
