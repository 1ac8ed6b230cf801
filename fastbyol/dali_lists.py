"""The DALI file lists that `python -m fastbyol.convert DIR --to dali` writes and the DALI loader reads:
the format in one place, below both.

Per split, OUT holds
  <split>.txt        `<path> <label>` per line, DALI's own file-list format (its reader takes the last
                     whitespace-separated token as the label, so paths may contain spaces). A path
                     starting with repaired/ is relative to OUT (a clean copy the converter wrote), any
                     other path to DIR (recorded in OUT/report.json).
  <split>_sizes.txt  line i: `<height> <width> <bytes>` of the file on line i of <split>.txt: the size
                     of the upright image (EXIF orientation applied, as DALI's decoder applies it) and
                     the file's length in bytes when it was converted. A separate file, so that
                     <split>.txt stays readable by DALI's file reader (`fn.readers.file(file_list=)`).
The dataset index of a sample is its line number. The converter leaves out the files it skips, so
after a skipped file these indices differ from the folder numbering of the torchvision loader.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastbyol import InputError

REPAIRED_DIR = "repaired"  # under OUT; also the prefix that marks a list line as relative to OUT
CONVERT_HINT = "python -m fastbyol.convert DIR --to dali"


class Entry(NamedTuple):
    """One listed file: its path as listed, label, upright height and width, and length in bytes."""

    path: str
    label: int
    height: int
    width: int
    nbytes: int


class Split(NamedTuple):
    """A converted split: absolute paths and per-sample tables, row i = line i of the list."""

    paths: list[str]
    labels: np.ndarray    # int64
    heights: np.ndarray   # int64
    widths: np.ndarray    # int64
    nbytes: np.ndarray    # int64


def list_line(path: str, label: int) -> str:
    if "\n" in path or "\r" in path:
        raise InputError(f"{path!r}: a file name with a line break cannot go in a DALI file list")
    return f"{path} {label}"


def write_split(folder: Path, split: str, entries: list[Entry]) -> list[str]:
    """Write <split>.txt and <split>_sizes.txt into `folder`; returns their names."""
    names = [f"{split}.txt", f"{split}_sizes.txt"]
    (folder / names[0]).write_text("".join(list_line(e.path, e.label) + "\n" for e in entries))
    (folder / names[1]).write_text("".join(f"{e.height} {e.width} {e.nbytes}\n" for e in entries))
    return names


def _source(out: Path) -> Path:
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        raise InputError(f"{out}: no complete converter output (report.json is missing or unreadable); "
                         f"run `{CONVERT_HINT}`") from None
    return Path(report["source"])


def _read_list(out: Path, split: str) -> tuple[list[str], list[int]]:
    try:
        lines = (out / f"{split}.txt").read_text().splitlines()
    except OSError:
        raise InputError(f"{out / f'{split}.txt'}: no such file list (the {split!r} split); "
                         f"run `{CONVERT_HINT}`") from None
    source = _source(out)
    paths, labels = [], []
    for line in lines:
        path, label = line.rsplit(maxsplit=1)
        base = out if path.startswith(REPAIRED_DIR + "/") else source
        paths.append(os.path.join(base, path))
        labels.append(int(label))
    return paths, labels


def file_list(out: str | os.PathLike, split: str) -> list[tuple[str, int]]:
    """(absolute path, label) for each line of OUT/<split>.txt."""
    paths, labels = _read_list(Path(out), split)
    return list(zip(paths, labels))


def read_split(out: str | os.PathLike, split: str) -> Split:
    """The list and the sizes of one split of a converter output. Raises InputError when either is
    missing or they disagree (an output of an older converter has no sizes)."""
    out = Path(out)
    paths, labels = _read_list(out, split)
    sizes_path = out / f"{split}_sizes.txt"
    try:
        sizes = np.fromstring(sizes_path.read_text(), dtype=np.int64, sep=" ")
    except OSError:
        raise InputError(f"{sizes_path}: missing (written by fastbyol.convert since image sizes are "
                         f"recorded); run `{CONVERT_HINT} --overwrite`") from None
    if sizes.size != 3 * len(paths):
        raise InputError(f"{sizes_path}: {sizes.size // 3} rows for {len(paths)} files in "
                         f"{out / f'{split}.txt'}; run `{CONVERT_HINT} --overwrite`")
    sizes = sizes.reshape(-1, 3)
    return Split(paths, np.asarray(labels, dtype=np.int64), sizes[:, 0].copy(), sizes[:, 1].copy(),
                 sizes[:, 2].copy())
