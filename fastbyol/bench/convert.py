"""`python -m fastbyol.bench convert`: our converter (validates every file) vs FFCV's DatasetWriter
over torchvision's ImageFolder, on the same folder, in one run.

    python -m fastbyol.bench convert [SOURCE ...] [--replicate N] [--max-side 512] [--workers N]
                                     [--reencode-all] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from fastbyol import InputError
from fastbyol.bench.record import SEED_PHOTOS

HELP = "our converter (validates every file) vs FFCV's DatasetWriter over ImageFolder"

def replicate_photos(count: int, destination: Path, seeds: Path = SEED_PHOTOS) -> Path:
    """An ImageFolder `destination/train/<class>/` of `count` files: the seed photos copied round
    robin, each copy a real file (so both converters read and decode every one)."""
    photos = sorted(seeds.glob("*/*.jpg"))
    if not photos:
        raise InputError(f"{seeds}: no seed photos (*/*.jpg); set FASTBYOL_SHARED_DATA")
    for i in range(count):
        photo = photos[i % len(photos)]
        target = destination / "train" / photo.parent.name / f"{photo.stem}-{i // len(photos):05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, target)
    return destination


def _source_folder(args, scratch: Path) -> tuple[Path, str]:
    """The folder to convert and a description of it: --replicate N, a folder, or .tar.gz archives
    extracted into scratch."""
    if args.replicate:
        folder = replicate_photos(args.replicate, scratch / "source")
        return folder, f"{args.replicate} replicated photos from {SEED_PHOTOS}"
    if not args.source:
        raise InputError("give a SOURCE folder or .tar.gz archives, or --replicate N")
    if len(args.source) == 1 and Path(args.source[0]).is_dir():
        return Path(args.source[0]), args.source[0]
    for archive in args.source:
        if not tarfile.is_tarfile(archive):
            raise InputError(f"{archive}: neither a folder nor a tar archive")
        with tarfile.open(archive) as tar:
            tar.extractall(scratch / "source", filter="data")
    return scratch / "source", " + ".join(args.source)


def _ffcv_writer_baseline(source: Path, out: Path, max_side: int, jpeg_quality: int, workers: int) -> dict:
    """FFCV's plain recipe: DatasetWriter over torchvision's ImageFolder, RGBImageField in 'jpg'
    mode (our output's format) with the same max side and quality. Returns the .beton sources."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder
    splits = [s for s in ("train", "val") if (source / s).is_dir()] or ["."]
    out.mkdir(parents=True)
    paths = {}
    for split in splits:
        dataset = ImageFolder(str(source / split))
        name = "train" if split == "." else split
        image = RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=jpeg_quality)
        fields = {"image": image, "label": IntField()}
        DatasetWriter(str(out / f"{name}.beton"), fields, num_workers=workers).from_indexed_dataset(dataset)
        paths[name] = [Path(p).relative_to(source).as_posix() for p, _ in dataset.samples]
    return dict(files=sum(len(p) for p in paths.values()), paths=paths)


def _our_converter(source: Path, out: Path, keep_original_jpegs: bool, **settings) -> dict:
    from fastbyol.convert import convert
    report = convert(source, "ffcv", out, keep_original_jpegs=keep_original_jpegs, **settings)
    paths = {s: (out / f"{s}_paths.txt").read_text().splitlines() for s in report["splits"]}
    return dict(files=sum(s["files"] for s in report["splits"].values()), paths=paths,
                counts=report["counts"], stored=report["stored"], phases=report["seconds"])


def _fidelity(source: Path, out: Path, paths: dict[str, list[str]], samples: int) -> float:
    """Mean abs difference (uint8) between .beton images, decoded by FFCV's decoder, and the
    reference decode (Pillow, upright, RGB, INTER_AREA to the stored size), over `samples` images
    spread evenly through each split."""
    import cv2
    from PIL import Image, ImageOps

    from fastbyol.pipelines.ffcv import open_beton, read_image
    diffs = []
    for split, split_paths in paths.items():
        reader = open_beton(out / f"{split}.beton")
        for index in np.linspace(0, len(split_paths) - 1, min(samples, len(split_paths))).astype(int):
            stored = read_image(reader, index)
            with Image.open(source / split_paths[index]) as img:
                reference = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
            if reference.shape != stored.shape:
                reference = cv2.resize(reference, stored.shape[1::-1], interpolation=cv2.INTER_AREA)
            diffs.append(np.abs(reference.astype(np.int16) - stored).mean())
    return float(np.mean(diffs))


def _stored_bytes(out: Path) -> int:
    """Bytes of sample data in the .beton files (their size on disk is rounded up to FFCV's pages)."""
    from fastbyol.pipelines.ffcv import open_beton
    return sum(int(open_beton(p).alloc_table["size"].sum()) for p in out.glob("*.beton"))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="*",
                        help="an ImageFolder, or .tar.gz archives of one (extracted first)")
    parser.add_argument("--replicate", type=int, metavar="N",
                        help=f"convert N copies of the 47 photos in {SEED_PHOTOS} instead")
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of each; the median counts")
    parser.add_argument("--reencode-all", action="store_true",
                        help="also time ours re-encoding every image, as RGBImageField does")
    parser.add_argument("--fidelity-samples", type=int, default=300,
                        help="images per split compared with the reference decode (0: skip)")
    parser.add_argument("--scratch", help="where sources and outputs go (default: a temp folder, removed)")
    parser.add_argument("--json", help="result file (default: benchmarks/results/convert-<name>.json)")
    parser.add_argument("--name", help="result name (default: photos<N>, or the source's name)")


def run(args, recorder) -> dict:
    from fastbyol.convert import import_ffcv_writer
    import_ffcv_writer()  # imported once, outside every timing (it compiles numba code: seconds)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="fastbyol-bench-"))
    settings = dict(max_side=args.max_side, jpeg_quality=args.jpeg_quality, workers=args.workers)
    contestants = {"ours": partial(_our_converter, keep_original_jpegs=True, **settings)}
    if args.reencode_all:
        contestants["ours, re-encode all"] = partial(_our_converter, keep_original_jpegs=False, **settings)
    contestants["ffcv DatasetWriter"] = partial(_ffcv_writer_baseline, **settings)
    results = {label: dict(seconds_each=[]) for label in contestants}
    try:
        source, description = _source_folder(args, scratch)
        for _ in range(args.repeat):  # interleaved, so that a busy moment hits every contestant
            for i, (label, run) in enumerate(contestants.items()):
                out = scratch / f"out-{i}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                outcome = run(source, out)
                results[label]["seconds_each"].append(time.perf_counter() - t0)
                results[label].update(outcome, stored_bytes=_stored_bytes(out))
        # After every conversion: the OpenCV calls here must not precede FFCV writer processes
        # forked from this one (OpenCV's thread pool does not survive a fork)
        for i, (label, result) in enumerate(results.items()):
            paths = result.pop("paths")
            if args.fidelity_samples:
                result["fidelity_mad"] = _fidelity(source, scratch / f"out-{i}", paths, args.fidelity_samples)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    for r in results.values():
        r["seconds"] = float(np.median(r["seconds_each"]))
        r["files_per_s"] = r["files"] / r["seconds"]
    reference = results["ffcv DatasetWriter"]["files_per_s"]
    rows = [{"path": label, "files": r["files"], "seconds": r["seconds"], "files/s": r["files_per_s"],
             "vs FFCV writer": r["files_per_s"] / reference, "JPEG MB": r["stored_bytes"] / 1e6,
             "MAD vs ref": r.get("fidelity_mad")} for label, r in results.items()]
    name = args.name or (f"photos{args.replicate}" if args.replicate
                         else Path(args.source[0]).name.split(".")[0])
    return dict(name=name, source=description, settings=settings, repeat=args.repeat, rows=rows,
                results=results,
                ratio_ours_vs_ffcv_writer=results["ours"]["files_per_s"] / reference, target_ratio=0.8,
                baseline=("ffcv.writer.DatasetWriter over torchvision.datasets.ImageFolder (default PIL "
                          "loader), RGBImageField(write_mode='jpg', max_resolution=max_side, "
                          "jpeg_quality=jpeg_quality), IntField; same workers"),
                seconds_are="median wall-clock seconds over `repeat` interleaved runs, FFCV import excluded",
                fidelity=("MAD vs ref: mean abs difference (uint8) between .beton images decoded by FFCV's "
                          "libjpeg-turbo call and Pillow's decode of the source (OpenCV INTER_AREA to the "
                          "stored size)"))

