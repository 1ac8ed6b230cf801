"""Make the benchmark ImageFolder: ImageNet-sized JPEGs cut from real photos, deterministically.

    python benchmarks/make_bench_folder.py OUT [--count 10000] [--seed 0] [--workers N] [--photos DIR]

OUT/train/<class>/<nnnnnn>.jpg: `--count` JPEGs at quality 90, each a random crop of one of the
photos (default: the 47 in ../shared/data/oddjpegs/dali_extra/single/jpeg, 640-1920 px, whose 19
class folders become the classes), resized to a random size around 500x375 (width 400-600, aspect
0.6-0.9, one in five portrait) and flipped at random. Image i depends only on (seed, i), so the same
command makes the same folder on any machine. The loader and FFCV benchmarks read it; a rerun over a
complete folder does nothing.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SHARED_DATA = Path(os.environ.get("FASTBYOL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_PHOTOS = SHARED_DATA / "oddjpegs" / "dali_extra" / "single" / "jpeg"
QUALITY = 90


def photo_list(folder: Path) -> list[tuple[Path, str]]:
    """(photo, class) for every JPEG in folder/<class>/, sorted."""
    photos = [(p, p.parent.name) for p in sorted(folder.glob("*/*")) if p.suffix.lower() in (".jpg", ".jpeg")]
    if not photos:
        sys.exit(f"make_bench_folder: no photos in {folder}/<class>/*.jpg")
    return photos


def make_image(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    width = int(rng.integers(400, 601))
    height = int(round(width * rng.uniform(0.6, 0.9)))
    if rng.random() < 0.2:
        width, height = height, width
    # the largest box of the target's aspect that fits, scaled to 50-100% of it, placed at random
    scale = np.sqrt(rng.uniform(0.5, 1.0))
    fit = min(photo.width / width, photo.height / height)
    box_w, box_h = max(1, int(width * fit * scale)), max(1, int(height * fit * scale))
    left = int(rng.integers(0, photo.width - box_w + 1))
    top = int(rng.integers(0, photo.height - box_h + 1))
    image = photo.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h),
                         reducing_gap=2.0)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


_photos: list[tuple[Path, str]] = []
_cache: dict[Path, Image.Image] = {}


def _write(job: tuple[int, int, str]) -> None:
    i, seed, out = job
    rng = np.random.default_rng([seed, i])
    path, cls = _photos[int(rng.integers(len(_photos)))]
    if path not in _cache:
        with Image.open(path) as img:
            _cache[path] = img.convert("RGB")
    target = Path(out) / "train" / cls / f"{i:06d}.jpg"
    buffer = io.BytesIO()
    make_image(_cache[path], rng).save(buffer, "JPEG", quality=QUALITY)
    target.write_bytes(buffer.getvalue())


def _init(photos):
    _photos[:] = photos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to make (OUT/train/<class>/*.jpg)")
    parser.add_argument("--count", type=int, default=10_000, help="how many JPEGs (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of <class>/*.jpg photos")
    args = parser.parse_args(argv)
    photos = photo_list(args.photos)
    done = args.out / f".complete-{args.count}-{args.seed}"
    if done.exists():
        print(f"{args.out}: already holds {args.count} images (seed {args.seed})")
        return
    for cls in sorted({cls for _, cls in photos}):
        (args.out / "train" / cls).mkdir(parents=True, exist_ok=True)
    jobs = [(i, args.seed, str(args.out)) for i in range(args.count)]
    with multiprocessing.Pool(args.workers, initializer=_init, initargs=(photos,)) as pool:
        for _ in pool.imap_unordered(_write, jobs, chunksize=64):
            pass
    done.touch()
    print(f"{args.out}: {args.count} JPEGs (quality {QUALITY}, about 500x375) from {len(photos)} photos")


if __name__ == "__main__":
    main()
