"""`python -m fastbyol.convert DIR --to ffcv|dali`: an ImageFolder to what the fast loaders read, with
every bad input named.

    python -m fastbyol.convert DIR --to ffcv [--out OUT] [--max-side 512] [--jpeg-quality 90]
                                             [--workers N] [--max-pixels N] [--overwrite]

DIR is `DIR/train/<class>/...` (and/or `DIR/val/<class>/...`), or `DIR/<class>/...` (a train split
only). Classes are the sorted class folder names of the train split, as torchvision's ImageFolder
orders them; hidden folders are not classes. Every image file is decoded once, in parallel, by Pillow
(the reference decoder) or, for a clean baseline JPEG bound for a .beton as it is, by libjpeg-turbo as
FFCV calls it, and sorted into

  ok        it decodes as it is;
  repaired  it decodes, but the fast loaders get a clean baseline RGB JPEG instead: CMYK/YCCK or
            grayscale to RGB, a PNG/BMP/TIFF/... named .jpg, EXIF orientation applied, a lossless,
            arithmetic-coded or 12-bit JPEG, a JPEG header with junk between its markers (DALI's
            decoder rejects those);
  skipped   with a reason: zero bytes, not an image, truncated, corrupt, unsupported (valid, but no
            decoder here reads it), over --max-pixels, unreadable.

Files without an image extension, and hidden files, are ignored and counted.

--to ffcv writes, per split, OUT/<split>.beton through FFCV's DatasetWriter (fields `image`, in
RGBImageField's JPEG format, and `label`) and OUT/<split>_paths.txt (line i: the DIR-relative source of
sample i). A clean baseline YCbCr JPEG within --max-side keeps its original bytes; every other usable
image is decoded, turned upright, fitted within --max-side and stored as a JPEG of --jpeg-quality
(see benchmarks/convert.md for the measurement behind keeping bytes).

--to dali writes, per split, the DALI file list OUT/<split>.txt (`<path> <label>` per line) and beside
it OUT/<split>_sizes.txt (`<height> <width> <bytes>` of each listed file: the upright image size the
DALI loader's sampler needs before decoding, and the length that tells a file changed since); the
format is fastbyol.dali_lists'. Originals are relative to DIR; repaired copies (full size, upright,
RGB, baseline JPEG) are written under OUT/repaired/, mirroring their DIR-relative path, and their
lines, relative to OUT, start with `repaired/`. `fastbyol.dali_lists.file_list` resolves a list to
absolute paths.

Both targets write OUT/classes.json (a list: index -> class name) and OUT/report.json (`counts` per
category, `reasons`, and `files`: every file that is not ok, with its category and reason).

Safety: outputs are built in OUT/.convert-<target>.partial/ and renamed into place at the end, report.json
last. That folder also checkpoints the validation pass, so an interrupted run resumes where it stopped.
A rerun over complete outputs says so and exits 0, unless --overwrite is given. DIR is only read.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

import fastbyol
from fastbyol import InputError
from fastbyol.dali_lists import REPAIRED_DIR, Entry, write_split
from fastbyol.pipelines.torchvision import is_hidden, to_rgb, walk_class_folder

log = logging.getLogger("fastbyol.convert")

# torchvision's IMG_EXTENSIONS (ImageFolder's default filter), compared in lower case.
SPLIT_NAMES = ("train", "val")
TARGETS = ("ffcv", "dali")
# Pillow's own decompression-bomb warning threshold: a sane default for photos.
DEFAULT_MAX_PIXELS = 89_478_485
METADATA_ALLOWANCE = 64 * 1024  # bytes a kept JPEG may carry beyond its raw pixel size
SPOOL_ORIGINALS_UP_TO = 64 * 1024  # kept JPEGs this small are copied to the checkpoint, larger ones re-read
CHECKPOINT_FORMAT = 2      # bump when a record's meaning changes, so old checkpoints are not resumed
FFCV_APT_PACKAGES = "pkg-config libturbojpeg0-dev libopencv-dev"

OK, REPAIRED, SKIPPED, IGNORED = "ok", "repaired", "skipped", "ignored"


@dataclass(frozen=True)
class Settings:
    """What the outputs depend on; a checkpoint is resumed only under the same settings."""
    source: str
    target: str
    max_side: int
    jpeg_quality: int
    max_pixels: int
    keep_original_jpegs: bool = True  # False: re-encode everything, as RGBImageField would (bench only)


# ---- Scanning the folder --------------------------------------------------------------------------

@dataclass
class Split:
    name: str
    folder: Path
    classes: list[str]
    # (DIR-relative path, label) in torchvision ImageFolder's order; (DIR-relative path, reason)
    files: list[tuple[str, int]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name))


def _walk_class_folder(root: Path, folder: Path, split: Split, label: int) -> None:
    """Add the files below one class folder to `split`, numbered as every loader numbers them."""
    for path, not_image in walk_class_folder(folder):
        rel = Path(os.path.relpath(path, root)).as_posix()
        if not_image:
            split.ignored.append((rel, not_image))
        else:
            split.files.append((rel, label))


def scan_source(root: Path) -> list[Split]:
    """The splits of DIR with their files. Raises InputError when DIR is missing or has no classes."""
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    named = [name for name in SPLIT_NAMES if (root / name).is_dir()]
    folders = {name: root / name for name in named} if named else {"train": root}
    if named:
        for other in sorted(set(_class_folders(root)) - set(SPLIT_NAMES)):
            log.warning("%s: not a split folder (train/, val/), not converted", root / other)
    classes_of = {name: _class_folders(folder) for name, folder in folders.items()}
    reference = next(iter(classes_of))  # train when present: its classes define the labels
    classes = classes_of[reference]
    if not classes:
        hint = f"{folders[reference]}/<class>/<images>"
        raise InputError(f"{folders[reference]}: no class folders (expected {hint})")
    if not named and REPAIRED_DIR in classes:
        # DALI list lines starting with repaired/ would be ambiguous (see fastbyol.dali_lists.file_list)
        raise InputError(f"{root / REPAIRED_DIR}: a class folder named {REPAIRED_DIR!r} is only "
                         "supported in the DIR/train/<class> layout")
    splits = []
    for name, folder in folders.items():
        unknown = sorted(set(classes_of[name]) - set(classes))
        if unknown:
            raise InputError(f"{folder}: class folders not in {folders[reference]}: "
                             + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
        split = Split(name, folder, classes)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.is_dir():
                split.ignored.append((Path(entry.path).relative_to(root).as_posix(), "not in a class folder"))
        for label, cls in enumerate(classes):
            if (folder / cls).is_dir():
                _walk_class_folder(root, folder / cls, split, label)
        splits.append(split)
    return splits


# ---- JPEG structure ------------------------------------------------------------------------------

BASELINE_SOF = 0xC0
LOSSLESS_SOFS = {0xC3, 0xC7, 0xCB, 0xCF}
ARITHMETIC_SOFS = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's markers up to its first scan say."""
    frame: int | None = None        # the SOF marker: 0xC0 baseline, 0xC2 progressive, ...
    precision: int | None = None
    components: int | None = None
    width: int = 0
    height: int = 0
    adobe_transform: int | None = None
    orientation: int | None = None  # EXIF orientation from IFD0
    exif_unclear: bool = False      # an EXIF block this parser cannot read with certainty
    multi_picture: bool = False     # an MPF (APP2) segment: an MPO file, Pillow's format "MPO"
    junk: str | None = None         # bytes between the markers, which some decoders reject
    scan: bool = False              # a scan (SOS) follows

    def keeps_original_bytes(self, nbytes: int, max_side: int) -> bool:
        """Whether the file can go into a .beton as it is, as far as its markers tell: a baseline
        8-bit YCbCr JPEG with well-formed markers, upright, within max_side, and not bloated by
        metadata (a big ICC profile or EXIF thumbnail would be read at every epoch)."""
        return (self.frame == BASELINE_SOF and self.precision == 8 and self.components == 3
                and self.adobe_transform in (None, 1) and self.scan and not self.junk
                and not self.multi_picture and not self.exif_unclear and self.orientation not in range(2, 9)
                and 0 < self.width <= max_side and 0 < self.height <= max_side
                and nbytes <= self.width * self.height * 3 + METADATA_ALLOWANCE)


def _exif_orientation(segment: bytes) -> int | None:
    """The Orientation tag (0x0112, one SHORT) in IFD0 of an APP1 Exif segment. Raises ValueError
    when the block cannot be read with certainty."""
    tiff = segment[6:]
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        raise ValueError("not a TIFF header")
    ifd = int.from_bytes(tiff[4:8], order)
    entries = int.from_bytes(tiff[ifd:ifd + 2], order)
    for i in range(entries):
        entry = tiff[ifd + 2 + 12 * i:ifd + 14 + 12 * i]
        if len(entry) < 12:
            raise ValueError("cut IFD")
        if int.from_bytes(entry[:2], order) == 0x0112:
            if entry[2:8] != (3).to_bytes(2, order) + (1).to_bytes(4, order):
                raise ValueError("orientation is not one SHORT")
            return int.from_bytes(entry[8:10], order)
    return None


def read_jpeg_header(data: bytes) -> JpegHeader:
    """Walk the marker segments of a JPEG (data starts with SOI) up to its first SOS."""
    found: dict = {}
    exif_blocks, junk, pos, end = 0, None, 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            next_marker = data.find(b"\xff", pos)
            if next_marker < 0:
                break
            junk = junk or f"{next_marker - pos} stray bytes before the marker at byte {next_marker}"
            pos = next_marker
            continue
        while pos < end and data[pos] == 0xFF:  # fill bytes are legal
            pos += 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker == 0xD8:
            junk = junk or f"a stray 0xFF{marker:02X} at byte {pos - 2}"
            continue
        if marker in STANDALONE_MARKERS:
            continue
        if marker == 0xD9 or pos + 2 > end:  # EOI, or cut off, before any scan
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        segment = data[pos + 2:pos + length]
        if marker in FRAME_MARKERS and len(segment) >= 6:
            found.update(frame=marker, precision=segment[0], height=int.from_bytes(segment[1:3], "big"),
                         width=int.from_bytes(segment[3:5], "big"), components=segment[5])
        elif marker == 0xE1 and segment[:6] == b"Exif\0\0":
            exif_blocks += 1
            try:
                found["orientation"] = _exif_orientation(segment)
            except ValueError:
                found["exif_unclear"] = True
        elif marker == 0xE2 and segment[:4] == b"MPF\0":
            found["multi_picture"] = True
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            found["adobe_transform"] = segment[11]
        elif marker == 0xDA:
            found["scan"] = True
            break
        pos += max(length, 2)
    if exif_blocks > 1:  # Pillow keeps the last one; do not guess
        found["exif_unclear"] = True
    return JpegHeader(junk=junk, **found)


# ---- Inspecting one file (runs in the worker processes) -----------------------------------------

def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


FRAME_NAMES = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless"}


def _describe(header: JpegHeader) -> str:
    if header.frame is None:
        return "a JPEG without a frame header"
    coding = ", arithmetic-coded" if header.frame in ARITHMETIC_SOFS else ""
    kind = FRAME_NAMES.get(header.frame, "JPEG")
    return f"{header.precision}-bit {kind} JPEG (SOF{header.frame - 0xC0}{coding})"


def _skip(record: dict, reason: str, detail: str | None = None) -> tuple[dict, None]:
    record.update(category=SKIPPED, reasons=[reason])
    if detail:
        record["detail"] = detail
    return record, None


def _skip_for_error(record: dict, err: Exception, header: JpegHeader | None) -> tuple[dict, None]:
    detail = f"{type(err).__name__}: {err}"
    if isinstance(err, UnidentifiedImageError):  # its message names a BytesIO object: say more
        detail = "Pillow cannot read it" + (f" ({_describe(header)})" if header else "")
    if "truncated" in str(err).lower():
        return _skip(record, "truncated", detail)
    if isinstance(err, UnidentifiedImageError):
        if header is None:
            return _skip(record, "not an image", detail)
        if header.precision not in (None, 8) or header.frame in LOSSLESS_SOFS:
            return _skip(record, "unsupported", detail)
    return _skip(record, "corrupt", detail)


def _repairs(fmt: str, mode: str, header: JpegHeader | None, orientation) -> tuple[list[str], list[str]]:
    """(reasons, details) for a decodable file that needs a clean copy; empty when it is ok."""
    reasons, details = [], []
    if header is None or fmt not in ("JPEG", "MPO"):
        reasons.append(f"{fmt}, not JPEG")
    else:
        if header.frame in LOSSLESS_SOFS:
            reasons.append("lossless JPEG")
        elif header.frame in ARITHMETIC_SOFS:
            reasons.append("arithmetic-coded JPEG")
        if header.precision not in (None, 8):
            reasons.append(f"{header.precision}-bit JPEG")
        if header.junk:
            reasons.append("malformed JPEG header")
            details.append(header.junk)
    if mode == "CMYK":
        reasons.append("YCCK to RGB" if header and header.adobe_transform == 2 else "CMYK to RGB")
    elif mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;16"):
        reasons.append("grayscale to RGB")
    if orientation in range(2, 9):
        reasons.append("EXIF orientation applied")
        details.append(f"orientation {orientation}")
    return reasons, details


def _ffcv_decodes_cleanly(data: bytes, width: int, height: int) -> bool:
    """Whether FFCV's own decoder (libjpeg-turbo's tjDecompress2, as its Loader calls it) decodes the
    file with neither an error nor a warning. At 1/8 scale: every coefficient is still read."""
    from ffcv.libffcv import imdecode
    scaled = np.empty(((height + 7) // 8, (width + 7) // 8, 3), np.uint8)
    return imdecode(np.frombuffer(data, np.uint8), scaled, height, width, height, width, 0, 0, 1, 8,
                    False, False) == 0


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)  # baseline, 4:2:0, no metadata
    return buffer.getvalue()


def downscale(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Downscale with Pillow's Hamming filter: of Pillow's filters, the closest to the OpenCV
    INTER_AREA that FFCV's own writer uses (mean abs diff 0.62 over the 47 photos at 512 px, where
    bicubic gives 0.96 and box 1.97), at about bilinear cost.
    (Not OpenCV itself: its thread pool deadlocks in processes forked from a parent that used it.)"""
    return img.resize(size, Image.Resampling.HAMMING)


Result = tuple[dict, bytes | None]  # a file's record, and the JPEG bytes its .beton sample stores


def inspect_file(job: tuple[str, str], settings: Settings, copy_root: str | None) -> Result:
    """Decode one file and classify it. Returns its record and, for --to ffcv, the JPEG bytes to
    store when the original bytes are not kept. For --to dali, a repaired copy is written under
    copy_root. Never raises for a bad file: every outcome is a record."""
    path, rel = job
    record = dict(path=rel, category=SKIPPED, reasons=[])
    try:
        stat = os.stat(path)
        record.update(size=stat.st_size, mtime=stat.st_mtime_ns)
        if not os.path.isfile(path):
            raise OSError("not a regular file")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return _skip(record, "unreadable", f"{type(err).__name__}: {err}")
    if not data:
        return _skip(record, "zero bytes")

    ffcv = settings.target == "ffcv"
    header = read_jpeg_header(data) if data[:2] == b"\xff\xd8" else None
    if (ffcv and settings.keep_original_jpegs and header
            and header.keeps_original_bytes(len(data), settings.max_side)
            and header.width * header.height <= settings.max_pixels
            and _ffcv_decodes_cleanly(data, header.width, header.height)):
        # libjpeg-turbo (under Pillow too) read every coefficient without a warning: the file is
        # valid, and its original bytes go into the .beton as they are. No Pillow needed.
        record.update(category=OK, width=header.width, height=header.height, stored="original")
        # A small file is cheaper to copy into the checkpoint now than to open again when writing
        return record, data if len(data) <= SPOOL_ORIGINALS_UP_TO else None
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > settings.max_pixels:
            return _skip(record, "over --max-pixels",
                         f"{width}x{height} = {width * height:,} pixels > {settings.max_pixels:,}")
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # an unreadable EXIF block says nothing about the pixels
            orientation = None
        reasons, details = _repairs(img.format, img.mode, header, orientation)
        upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        stored_size = fit_within(*upright, settings.max_side) if ffcv else upright
        record.update(width=stored_size[0], height=stored_size[1])
        if details:
            record["detail"] = "; ".join(details)
        # Decoding at a reduced DCT scale still reads every coefficient of the file: it validates
        # as much as a full decode, for a fraction of the work.
        if not ffcv and not reasons:
            img.draft(None, (1, 1))  # the DALI loader reads the original: decoding only validates
        elif stored_size != upright:
            img.draft(None, stored_size if upright == (width, height) else stored_size[::-1])
        img.load()
    except Exception as err:  # Pillow raises many types on damaged input; each one means "bad file"
        return _skip_for_error(record, err, header)

    record.update(category=REPAIRED if reasons else OK, reasons=reasons)
    if not ffcv and not reasons:
        return record, None
    try:
        rgb = to_rgb(ImageOps.exif_transpose(img) if orientation in range(2, 9) else img)
        if rgb.size != stored_size:
            rgb = downscale(rgb, stored_size)
        payload = encode_jpeg(rgb, settings.jpeg_quality)
    except Exception as err:  # e.g. a pixel mode Pillow cannot convert to RGB
        return _skip(record, "unsupported", f"{type(err).__name__}: {err}")
    if ffcv:
        record["stored"] = "reencoded"
        return record, payload
    record["copy"] = repaired_copy_path(rel)
    destination = Path(copy_root) / record["copy"]
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(payload)
    record["copy_size"] = len(payload)
    return record, None


def repaired_copy_path(rel: str) -> str:
    """OUT-relative path of the repaired copy of DIR-relative `rel`: it mirrors rel under repaired/,
    with .jpg appended unless rel already ends in .jpg/.jpeg."""
    suffix = "" if os.path.splitext(rel)[1].lower() in (".jpg", ".jpeg") else ".jpg"
    return f"{REPAIRED_DIR}/{rel}{suffix}"


def _init_worker() -> None:
    Image.MAX_IMAGE_PIXELS = None   # --max-pixels decides, before decoding
    warnings.simplefilter("ignore")  # Pillow warns about odd EXIF/MPO data; the records say enough


# ---- The validation pass, checkpointed -----------------------------------------------------------

class ValidationLog:
    """The checkpoint of the validation pass: records.jsonl (one JSON record per validated file) and,
    for --to ffcv, payloads.bin (the JPEG bytes the records point into: re-encoded images, and small
    originals, which are cheaper to copy now than to open again when writing). A record is appended
    only after its payload is written, so whatever a killed run left behind is consistent."""

    def __init__(self, folder: Path):
        self.records_path = folder / "records.jsonl"
        self.payloads_path = folder / "payloads.bin"

    def load(self) -> dict[str, dict]:
        records = {}
        if self.records_path.exists():
            with open(self.records_path, "rb") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # the torn last line of an interrupted run
                        break
                    records[record["path"]] = record
        committed = max((r["offset"] + r["length"] for r in records.values() if "offset" in r), default=0)
        if self.payloads_path.exists() and self.payloads_path.stat().st_size > committed:
            os.truncate(self.payloads_path, committed)  # payloads whose record never made it
        return records

    def __enter__(self):
        self._records = open(self.records_path, "ab")
        self._payloads = open(self.payloads_path, "ab")
        return self

    def __exit__(self, *exc):
        self._records.close()
        self._payloads.close()

    def append(self, results: list[Result]) -> None:
        """Commit a batch of (record, payload): payloads first, then their records, one flush each."""
        for record, payload in results:
            if payload is not None:
                record.update(offset=self._payloads.tell(), length=len(payload))
                self._payloads.write(payload)
        self._payloads.flush()
        self._records.write(b"".join(json.dumps(record).encode() + b"\n" for record, _ in results))
        self._records.flush()


def inspect_batch(jobs: list[tuple[str, str]], settings: Settings, copy_root: str) -> list[Result]:
    return [inspect_file(job, settings, copy_root) for job in jobs]


def validate_files(jobs: list[tuple[str, str]], settings: Settings, workers: int, checkpoint: ValidationLog,
                   copy_root: Path, already: int) -> list[dict]:
    """Decode every job in parallel, in batches (one message and one checkpoint flush per batch),
    appending each batch of records to the checkpoint as it arrives."""
    if not jobs:
        return []
    size = max(1, min(64, len(jobs) // (workers * 8)))
    batches = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    records = []
    with multiprocessing.Pool(workers, initializer=_init_worker) as pool, checkpoint, \
            tqdm(total=already + len(jobs), initial=already, unit="files", desc="validating",
                 dynamic_ncols=True, mininterval=0.5, smoothing=0.05) as bar:
        inspect = partial(inspect_batch, settings=settings, copy_root=str(copy_root))
        for results in pool.imap_unordered(inspect, batches):
            checkpoint.append(results)
            records += [record for record, _ in results]
            bar.update(len(results))
    return records


def _still_valid(record: dict, source: Path, partial_dir: Path) -> bool:
    """A checkpointed record stands if its file is unchanged and its repaired copy is still there (an
    interrupt while renaming the outputs into place may have moved the copies away)."""
    try:
        stat = (source / record["path"]).stat()
    except OSError:
        return False
    unchanged = record.get("size") == stat.st_size and record.get("mtime") == stat.st_mtime_ns
    return unchanged and ("copy" not in record or (partial_dir / record["copy"]).is_file())


# ---- Writing the .beton files ---------------------------------------------------------------------

def import_ffcv_writer():
    try:
        import ffcv.writer  # noqa: F401  (imports numba, OpenCV and libffcv's native code)
        from ffcv.fields import IntField, RGBImageField
    except (ImportError, OSError) as err:
        raise InputError(f"--to ffcv needs FFCV, which does not import ({type(err).__name__}: {err}). "
                         "Install it with `pip install 'fastbyol[ffcv]'` after the apt packages it builds "
                         f"against: sudo apt-get install {FFCV_APT_PACKAGES}") from err
    return ffcv.writer, IntField, RGBImageField


def _stored_jpegs_field(RGBImageField):
    """The image field: RGBImageField's on-disk format (JPEG mode), filled with JPEG bytes the
    validation pass prepared (the original file, or its clean re-encoding), instead of decoding and
    re-encoding everything as RGBImageField.encode does. (Defined on first use: importing FFCV,
    its base class, takes seconds, and --to dali does without it.)"""

    class StoredJPEGsField(RGBImageField):
        def __init__(self):
            super().__init__(write_mode="jpg")

        def encode(self, destination, value, malloc):
            jpeg, height, width = value
            destination["mode"] = 0  # FFCV's IMAGE_MODES['jpg']
            destination["height"], destination["width"] = height, width
            destination["data_ptr"], storage = malloc(jpeg.size)
            storage[:] = jpeg

    return StoredJPEGsField


class _BetonSamples:
    """The indexable dataset DatasetWriter's workers read: (jpeg, height, width), label per sample.
    A source file that changed since validation cannot be dropped from a .beton being written, so it
    is noted in errors_path, stored as a 1x1 stand-in, and the caller discards the .beton."""

    def __init__(self, root: Path, samples: list[tuple[dict, int]], payloads_path: Path, errors_path: Path):
        self.root, self.samples = root, samples
        self.payloads_path, self.errors_path = payloads_path, errors_path
        self._payloads = None

    def __len__(self):
        return len(self.samples)

    def _jpeg_bytes(self, record: dict) -> bytes:
        if "offset" in record:  # in the checkpoint's payloads
            if self._payloads is None:  # opened lazily: once per writer process
                self._payloads = open(self.payloads_path, "rb")
            return os.pread(self._payloads.fileno(), record["length"], record["offset"])
        data = (self.root / record["path"]).read_bytes()
        if len(data) != record["size"]:
            raise OSError(f"its size changed from {record['size']} to {len(data)} bytes")
        return data

    def __getitem__(self, index):
        record, label = self.samples[index]
        try:
            jpeg, height, width = self._jpeg_bytes(record), record["height"], record["width"]
        except OSError as err:
            with open(self.errors_path, "a") as f:
                f.write(f"{self.root / record['path']}: {err}\n")
            jpeg, height, width = encode_jpeg(Image.new("RGB", (1, 1)), 90), 1, 1
        return (np.frombuffer(jpeg, np.uint8), height, width), label


def _mark_as_rgb_image_field(path: Path, field_index: int) -> None:
    """DatasetWriter records a field's type by its exact class, so a subclass is written as 'custom'
    (255) and FFCV would refuse to read it without being told the class. The bytes are RGBImageField's
    format, so record the field as RGBImageField: stock FFCV Loaders read the file as it is."""
    from ffcv.fields import RGBImageField
    from ffcv.types import TYPE_ID_HANDLER, FieldDescType, HeaderType
    type_id = next(k for k, v in TYPE_ID_HANDLER.items() if v is RGBImageField)
    offset = HeaderType.itemsize + field_index * FieldDescType.itemsize
    with open(path, "r+b") as f:
        f.seek(offset)
        descriptor = np.frombuffer(f.read(FieldDescType.itemsize), FieldDescType).copy()
        descriptor["type_id"] = type_id
        f.seek(offset)
        f.write(descriptor.tobytes())


def write_beton(path: Path, root: Path, samples: list[tuple[dict, int]], payloads_path: Path,
                workers: int) -> None:
    writer_module, IntField, RGBImageField = import_ffcv_writer()
    errors_path = path.with_suffix(".errors.txt")
    errors_path.unlink(missing_ok=True)
    sizes = [r.get("length", r["size"]) for r, _ in samples]
    # FFCV's default page size, or more: one sample must fit in a page
    page_size = max(writer_module.MIN_PAGE_SIZE * 4, 1 << (max(sizes) - 1).bit_length())
    # A DatasetWriter process that fails (a full disk) leaves the writer waiting forever: check first
    needed = sum(sizes) + (workers + 2) * page_size + len(samples) * 64
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise InputError(f"{path.parent}: {free / 1e9:.1f} GB free, writing {path.name} needs about "
                         f"{needed / 1e9:.1f} GB")
    fields = {"image": _stored_jpegs_field(RGBImageField)(), "label": IntField()}
    writer = writer_module.DatasetWriter(str(path), fields, page_size=page_size, num_workers=workers)
    writer.from_indexed_dataset(_BetonSamples(root, samples, payloads_path, errors_path),
                                chunksize=max(1, min(256, len(samples) // (workers * 4))))
    if errors_path.exists():
        first = errors_path.read_text().splitlines()
        path.unlink()
        raise InputError(f"{first[0]} (and {len(first) - 1} more): source files changed during the "
                         "conversion; run the same command again to convert them afresh")
    _mark_as_rgb_image_field(path, list(fields).index("image"))


# ---- DALI file lists --------------------------------------------------------------------------------

def dali_entries(samples: list[tuple[dict, int]]) -> list[Entry]:
    """The listed file of each usable sample (its repaired copy, if any), with its upright size and
    its length in bytes."""
    return [Entry(record.get("copy", record["path"]), label, record["height"], record["width"],
                  record.get("copy_size", record["size"])) for record, label in samples]


# ---- Report and summary -----------------------------------------------------------------------------

def build_report(settings: Settings, out: Path, splits: list[Split], records: dict[str, dict],
                 outputs: list[str], seconds: dict, workers: int) -> dict:
    counts, reasons = Counter({OK: 0, REPAIRED: 0, SKIPPED: 0, IGNORED: 0}), {}
    files, split_info, stored = [], {}, Counter()
    for split in splits:
        here = Counter({OK: 0, REPAIRED: 0, SKIPPED: 0, IGNORED: len(split.ignored)})
        usable_per_class = Counter()
        for rel, label in split.files:
            record = records[rel]
            here[record["category"]] += 1
            if record["category"] != SKIPPED:
                usable_per_class[label] += 1
                stored[record.get("stored")] += 1
            if record["category"] != OK:
                entry = dict(path=rel, split=split.name, category=record["category"],
                             reason="; ".join(record["reasons"]))
                entry.update({k: record[k] for k in ("detail", "copy") if k in record})
                files.append(entry)
            for reason in record["reasons"]:
                reasons.setdefault(record["category"], Counter())[reason] += 1
        for rel, reason in split.ignored:
            files.append(dict(path=rel, split=split.name, category=IGNORED, reason=reason))
            reasons.setdefault(IGNORED, Counter())[reason] += 1
        counts.update(here)
        split_info[split.name] = dict(
            files=len(split.files), samples=here[OK] + here[REPAIRED], **here,
            empty_classes=[c for i, c in enumerate(split.classes) if not usable_per_class[i]])
    report = dict(
        fastbyol_version=fastbyol.__version__, source=settings.source, out=str(out), target=settings.target,
        settings=dict(max_side=settings.max_side, jpeg_quality=settings.jpeg_quality,
                      max_pixels=settings.max_pixels, workers=workers),
        classes=len(splits[0].classes), splits=split_info, counts=dict(counts),
        reasons={k: dict(v.most_common()) for k, v in reasons.items()}, outputs=outputs,
        seconds={k: round(v, 3) for k, v in seconds.items()}, files=files)
    if settings.target == "ffcv":
        report["stored"] = {"original JPEG bytes": stored["original"], "re-encoded": stored["reencoded"]}
    return report


def summary(report: dict, max_listed: int = 8) -> str:
    """The one-screen console summary."""
    target, out = report["target"], report["out"]
    lines = [f"fastbyol.convert: {report['source']} -> {out} (--to {target}), {report['classes']} classes"]
    lines.append(f"  {'split':<7}{'files':>10}{'ok':>10}{'repaired':>10}{'skipped':>10}{'ignored':>10}")
    for name, s in report["splits"].items():
        lines.append(f"  {name:<7}{s['files']:>10,}{s['ok']:>10,}{s['repaired']:>10,}"
                     f"{s['skipped']:>10,}{s['ignored']:>10,}")
    for category in (SKIPPED, REPAIRED, IGNORED):
        if report["reasons"].get(category):
            top = list(report["reasons"][category].items())
            text = ", ".join(f"{reason} {n:,}" for reason, n in top[:6])
            lines.append(f"  {category}: {text}{', ...' if len(top) > 6 else ''}")
    for name, s in report["splits"].items():
        if s["empty_classes"]:
            lines.append(f"  warning: {name}: no usable image in class " + ", ".join(s["empty_classes"][:5])
                         + (" ..." if len(s["empty_classes"]) > 5 else "") + " (labels kept)")
    listed = [f for f in report["files"] if f["category"] != IGNORED]
    for f in listed[:max_listed]:
        lines.append(f"    {f['category']:<9} {f['path']}: {f['reason']}")
    if len(listed) > max_listed:
        lines.append(f"    ... {len(listed) - max_listed:,} more")
    if "stored" in report:
        kept, again = report["stored"].values()
        settings = report["settings"]
        lines.append(f"  .beton images: {kept:,} original JPEG bytes, {again:,} re-encoded "
                     f"(quality {settings['jpeg_quality']}, max side {settings['max_side']})")
    seconds = report["seconds"]
    files_now = sum(s["files"] for s in report["splits"].values()) - report.get("resumed_files", 0)
    lines.append(f"  wrote {', '.join(report['outputs'])} and report.json (every file that is not ok) "
                 f"in {out}")
    resumed = f", {report['resumed_files']:,} more from the checkpoint" if report.get("resumed_files") else ""
    lines.append(f"  {seconds['total']:.1f} s: {files_now / max(seconds['total'], 1e-9):,.0f} files/s "
                 f"(validate {seconds['validate']:.1f} s, write {seconds['write']:.1f} s, "
                 f"{report['settings']['workers']} workers{resumed})")
    return "\n".join(lines)


# ---- The conversion ------------------------------------------------------------------------------

def default_out(source: Path, target: str) -> Path:
    return source.parent / f"{source.name}-{target}"


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".convert-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(f"{out}: output folder is not writable ({err.strerror or err})") from None


def _complete_report(out: Path) -> dict | None:
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if all((out / name).exists() for name in report.get("outputs", [])):
        return report
    return None


def _start_checkpoint(partial_dir: Path, settings: Settings) -> bool:
    """Prepare the partial folder; True when it holds a resumable run under the same settings."""
    settings_path = partial_dir / "settings.json"
    wanted = dict(dataclasses.asdict(settings), checkpoint_format=CHECKPOINT_FORMAT)
    if settings_path.exists():
        try:
            if json.loads(settings_path.read_text()) == wanted:
                return True
        except ValueError:
            pass
        log.info("%s: settings changed since the interrupted run; starting over", partial_dir)
    shutil.rmtree(partial_dir, ignore_errors=True)
    partial_dir.mkdir(parents=True)
    settings_path.write_text(json.dumps(wanted, indent=1))
    return False


def convert(source: str | os.PathLike, target: str, out: str | os.PathLike | None = None, *,
            max_side: int = 512, jpeg_quality: int = 90, workers: int | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS, overwrite: bool = False,
            keep_original_jpegs: bool = True) -> dict:
    """Convert the ImageFolder at `source`; returns the report (also OUT/report.json). Raises
    InputError for bad input. When OUT already holds a complete conversion for this target and
    `overwrite` is False, returns that report with report['already_complete'] = True."""
    if target not in TARGETS:
        raise InputError(f"--to {target}: choose one of {', '.join(TARGETS)}")
    if not 1 <= max_side <= 65535:  # FFCV stores width and height as uint16
        raise InputError(f"--max-side {max_side}: must be within 1..65535")
    if not 1 <= jpeg_quality <= 100:
        raise InputError(f"--jpeg-quality {jpeg_quality}: must be within 1..100")
    if max_pixels < 1:
        raise InputError(f"--max-pixels {max_pixels}: must be positive")
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    if workers < 1:
        raise InputError(f"--workers {workers}: must be positive")
    source = Path(source).absolute()
    out = Path(out).absolute() if out else default_out(source, target)
    if not source.is_dir():
        raise InputError(f"{source}: no such folder")
    if out.resolve().is_relative_to(source.resolve()):
        raise InputError(f"--out {out}: must not be inside DIR {source} (DIR is only read)")

    previous = _complete_report(out)
    if previous and not overwrite:
        asked = dict(target=target, source=str(source), max_side=max_side, jpeg_quality=jpeg_quality,
                     max_pixels=max_pixels)
        held = dict(previous["settings"], target=previous["target"], source=previous["source"])
        differ = [f"{k} {held.get(k)}" for k in asked if held.get(k) != asked[k]]
        if differ:
            raise InputError(f"{out} holds a complete conversion with other settings ({', '.join(differ)}); "
                             "choose another --out, or pass --overwrite to replace it")
        return dict(previous, already_complete=True)
    if target == "ffcv":
        import_ffcv_writer()  # fail now, not after the validation pass; and keep its seconds out of the timings
    t_start = time.perf_counter()
    splits = scan_source(source)
    _check_writable(out)
    settings = Settings(str(source), target, max_side, jpeg_quality, max_pixels, keep_original_jpegs)
    partial_dir = out / f".convert-{target}.partial"
    if overwrite:
        shutil.rmtree(partial_dir, ignore_errors=True)
        (out / "report.json").unlink(missing_ok=True)  # the old outputs are no longer "complete"
    resuming = _start_checkpoint(partial_dir, settings)
    checkpoint = ValidationLog(partial_dir)
    t_scanned = time.perf_counter()

    # Validation pass: everything not already in the checkpoint (unchanged since it was recorded)
    records = checkpoint.load() if resuming else {}
    all_files = [rel for split in splits for rel, _ in split.files]
    records = {rel: records[rel] for rel in all_files
               if rel in records and _still_valid(records[rel], source, partial_dir)}
    if resuming:
        log.info("resuming the interrupted run in %s: %d of %d files already validated",
                 partial_dir, len(records), len(all_files))
    jobs = [(str(source / rel), rel) for rel in all_files if rel not in records]
    for record in validate_files(jobs, settings, workers, checkpoint, partial_dir, already=len(records)):
        records[record["path"]] = record
    t_validated = time.perf_counter()

    # Outputs, built in the partial folder
    outputs = []
    for split in splits:
        samples = [(records[rel], label) for rel, label in split.files if records[rel]["category"] != SKIPPED]
        if not samples:
            raise InputError(f"{split.folder}: no usable image in the {split.name} split (each file's "
                             f"reason is in {checkpoint.records_path})")
        usable = Counter(label for _, label in samples)
        for label, cls in enumerate(split.classes):
            if not usable[label]:
                log.warning("%s: no usable image in this class folder (its label %d is kept)",
                            split.folder / cls, label)
        if target == "ffcv":
            log.info("writing %s.beton (%d images)", split.name, len(samples))
            write_beton(partial_dir / f"{split.name}.beton", source, samples, checkpoint.payloads_path,
                        workers)
            (partial_dir / f"{split.name}_paths.txt").write_text(
                "".join(record["path"] + "\n" for record, _ in samples))
            outputs += [f"{split.name}.beton", f"{split.name}_paths.txt"]
        else:
            outputs += write_split(partial_dir, split.name, dali_entries(samples))
    if target == "dali":
        (partial_dir / REPAIRED_DIR).mkdir(exist_ok=True)
        outputs.append(REPAIRED_DIR)
    (partial_dir / "classes.json").write_text(json.dumps(splits[0].classes, indent=1) + "\n")
    outputs.append("classes.json")
    t_written = time.perf_counter()

    seconds = dict(scan=t_scanned - t_start, validate=t_validated - t_scanned,
                   write=t_written - t_validated, total=t_written - t_start)
    report = build_report(settings, out, splits, records, outputs, seconds, workers)
    report["resumed_files"] = len(all_files) - len(jobs)  # validated by an interrupted run
    (partial_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")

    # Into place: the report last, so that its presence means "complete"
    if previous and overwrite:
        for name in previous.get("outputs", []):
            stale = out / name
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    for name in outputs:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        os.replace(partial_dir / name, out / name)
    os.replace(partial_dir / "report.json", out / "report.json")
    shutil.rmtree(partial_dir)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastbyol.convert",
        description="Convert an ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*, or DIR/<class>/*) into "
                    "FFCV .beton files or DALI file lists, validating every file.")
    parser.add_argument("dir", metavar="DIR", help="the ImageFolder; it is only read")
    parser.add_argument("--to", required=True, choices=TARGETS, help="what the loader reads")
    parser.add_argument("--out", metavar="OUT",
                        help="output folder (default: DIR-ffcv or DIR-dali, beside DIR)")
    parser.add_argument("--max-side", type=int, default=512,
                        help="ffcv: longest side stored in the .beton (default 512); dali reads originals")
    parser.add_argument("--jpeg-quality", type=int, default=90,
                        help="quality of re-encoded JPEGs (default 90)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"skip images with more pixels than this (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--overwrite", action="store_true", help="redo a conversion OUT already holds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        report = convert(args.dir, args.to, args.out, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                         workers=args.workers, max_pixels=args.max_pixels, overwrite=args.overwrite)
    except InputError as exc:
        print(f"fastbyol.convert: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nfastbyol.convert: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    if report.get("already_complete"):
        print(f"fastbyol.convert: {report['out']} already holds a complete --to {args.to} conversion of "
              f"{report['source']} (report.json); nothing to do. Pass --overwrite to redo it.")
        return
    print(summary(report))


if __name__ == "__main__":
    main()
