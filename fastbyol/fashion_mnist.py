"""The embedded default data set: Fashion-MNIST from Debian's `dataset-fashion-mnist`, turned once into an
ImageFolder of PNG files (train/ 60k, val/ 10k) in a cache folder, so it takes the ordinary data path."""
from __future__ import annotations

import gzip
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fastbyol import InputError

log = logging.getLogger(__name__)

SOURCE = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
SOURCE_VARIABLE = "FASTBYOL_FASHION_MNIST"  # a folder of the four IDX .gz files, where Debian's is absent
# Numbered so that ImageFolder's sorted class order is the data set's label order.
CLASSES = ("0-tshirt-top", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt",
           "7-sneaker", "8-bag", "9-ankle-boot")
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def default_cache() -> Path:
    return Path(os.environ.get("FASTBYOL_CACHE", Path.home() / ".cache" / "fastbyol"))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian header: magic with the number of dimensions, then the sizes)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise InputError(f"{path}: truncated IDX file ({array.size} values for shape {shape})")
    return array.reshape(shape)


def default_source() -> Path:
    return Path(os.environ.get(SOURCE_VARIABLE) or SOURCE)


def ensure_fashion_mnist(cache: Path | None = None, source: Path | None = None) -> Path:
    """The ImageFolder root, built on first use from the IDX files in `source` (default: the folder
    $FASTBYOL_FASHION_MNIST names, else Debian's). Written into a temporary folder and renamed, so
    an interrupted build is redone rather than half-used."""
    root = (cache or default_cache()) / "fashion-mnist"
    if (root / "COMPLETE").exists():
        return root
    source = source or default_source()
    missing = [name for pair in SPLITS.values() for name in pair if not (source / name).exists()]
    if missing:
        raise InputError(f"Fashion-MNIST not found in {source} (missing {missing[0]}): install it with "
                         f"`sudo apt-get install dataset-fashion-mnist`, set {SOURCE_VARIABLE} to a "
                         "folder of its four IDX .gz files, or pass --data DIR")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, (images_file, labels_file) in SPLITS.items():
        images, labels = read_idx(source / images_file), read_idx(source / labels_file)
        for name in CLASSES:
            (tmp / split / name).mkdir(parents=True)
        for i, (image, label) in enumerate(tqdm(zip(images, labels), total=len(labels),
                                                desc=f"caching Fashion-MNIST {split} as PNG",
                                                unit="img", mininterval=2)):
            Image.fromarray(image, mode="L").save(tmp / split / CLASSES[label] / f"{i:05d}.png",
                                                  compress_level=1)
    (tmp / "COMPLETE").write_text("60000 train + 10000 val\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    log.info("Fashion-MNIST cached as PNG under %s", root)
    return root
