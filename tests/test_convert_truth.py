"""Converter truth (issue 13, item 6): every EXIF-oriented file of the odd set is stored upright, its
stored width and height the upright ones fitted within --max-side (the shape of what is stored, read
back, not pixels after resizing to it), and every orientation 2-8, mirrors included, is reported as
repaired, for both targets."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

from fastbyol.convert import convert

pytest.importorskip("ffcv")
MAX_SIDE = 100  # below the 640 px photos and the 128 px hopper: the fit is exercised


def exif_orientation(path) -> int | None:
    try:
        with Image.open(path) as img:
            return img.getexif().get(0x0112)
    except Exception:
        return None


def upright_size(path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, by Pillow, independently of the converter."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).size


@pytest.fixture(scope="module")
def oriented(shared_data, tmp_path_factory):
    """Every file of oddjpegs with an EXIF orientation of 2-8 that Pillow decodes, copied into one
    class folder; plus an upright control. Returns (folder, {rel path: orientation})."""
    root = tmp_path_factory.mktemp("oriented") / "dir"
    folder = root / "train" / "oriented"
    folder.mkdir(parents=True)
    found = {}
    for path in sorted((shared_data / "oddjpegs").rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".jpg", ".jpeg"):
            continue
        orientation = exif_orientation(path)
        if orientation in range(2, 9):
            try:
                upright_size(path)
                with Image.open(path) as img:
                    img.load()
            except Exception:
                continue  # a broken file is another test's business
            name = path.relative_to(shared_data / "oddjpegs").as_posix().replace("/", "__")
            shutil.copyfile(path, folder / name)
            found[f"train/oriented/{name}"] = orientation
    control = "oddjpegs/dali_extra/imgcodec/jpeg/orientation/padlock-406986_640_no_exif.jpg"
    shutil.copyfile(shared_data / control, folder / "upright.jpg")
    return root, found


@pytest.fixture(scope="module")
def converted(oriented, tmp_path_factory):
    root, _ = oriented
    out = tmp_path_factory.mktemp("oriented-out")
    return {target: (out / target, convert(root, target, out / target, max_side=MAX_SIDE, workers=1))
            for target in ("ffcv", "dali")}


def test_the_odd_set_has_every_orientation(oriented):
    _, found = oriented
    assert set(found.values()) == set(range(2, 9)), sorted(set(found.values()))
    # mirrors (2, 4, 5, 7) and side-swapping ones (5-8) with a non-square image each
    assert any(o in (5, 6, 7, 8) for o in found.values())


@pytest.mark.parametrize("target", ["ffcv", "dali"])
def test_every_orientation_is_reported_as_repaired(oriented, converted, target):
    _, found = oriented
    report = converted[target][1]
    files = {f["path"]: f for f in report["files"]}
    for rel, orientation in found.items():
        assert rel in files, f"{rel} (orientation {orientation}) is not reported"
        record = files[rel]
        assert record["category"] == "repaired", (rel, record)
        assert "EXIF orientation applied" in record["reason"], (rel, record)
        assert f"orientation {orientation}" in record.get("detail", ""), (rel, record)
    assert "train/oriented/upright.jpg" not in files  # the upright control is simply ok


def fitted(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Within max_side: the longer side becomes max_side, the other keeps the ratio (+-1 rounding)."""
    if max(width, height) <= max_side:
        return width, height
    return (max_side, height * max_side / width) if width >= height else (width * max_side / height, max_side)


def assert_shape(rel, got_wh, expected_wh):
    (gw, gh), (ew, eh) = got_wh, expected_wh
    assert abs(gw - ew) <= 1 and abs(gh - eh) <= 1, f"{rel}: stored {gw}x{gh}, upright fit {ew:.1f}x{eh:.1f}"


def test_the_beton_stores_the_upright_shape_within_max_side(oriented, converted):
    from fastbyol.pipelines.ffcv import open_beton, read_image
    root, found = oriented
    out, _ = converted["ffcv"]
    paths = (out / "train_paths.txt").read_text().splitlines()
    reader = open_beton(out / "train.beton")
    assert set(found) <= set(paths)
    for index, rel in enumerate(paths):
        width, height = upright_size(root / rel)
        expected = fitted(width, height, MAX_SIDE)
        stored = read_image(reader, index)  # the JPEG actually stored, decoded: (H, W, 3)
        assert stored.ndim == 3 and stored.shape[2] == 3
        assert_shape(rel, (stored.shape[1], stored.shape[0]), expected)
        assert max(stored.shape[:2]) <= MAX_SIDE
        if width != height and rel in found:  # the side that is longer upright is longer stored
            assert (stored.shape[1] > stored.shape[0]) == (width > height), rel


def test_dali_repaired_copies_are_full_size_and_upright(oriented, converted):
    root, found = oriented
    out, report = converted["dali"]
    records = {f["path"]: f for f in report["files"]}
    lines = (out / "train.txt").read_text().splitlines()
    sizes = (out / "train_sizes.txt").read_text().splitlines()  # line i: upright height width bytes
    assert len(sizes) == len(lines)
    for line, size in zip(lines, sizes):
        listed = line.rsplit(" ", 1)[0]
        source = root / listed if not listed.startswith("repaired/") else out / listed
        height, width = (int(v) for v in size.split()[:2])
        assert (width, height) == upright_size(source), (listed, size)
    for rel in found:
        record = records[rel]
        copy = out / record["copy"]
        assert any(line.startswith(record["copy"] + " ") for line in lines), rel
        with Image.open(copy) as img:
            assert img.getexif().get(0x0112) in (None, 1), rel  # no orientation left to apply
            assert img.size == upright_size(root / rel), (rel, img.size)
        # and it is the upright picture, not only the upright shape
        with Image.open(root / rel) as src, Image.open(copy) as img:
            a = np.asarray(ImageOps.exif_transpose(src).convert("RGB"), dtype=np.int16)
            b = np.asarray(img.convert("RGB"), dtype=np.int16)
            if min(a.shape[:2]) >= 16:  # tiny images lose more to 4:2:0 chroma
                assert np.abs(a - b).mean() < 4.0, rel
    assert json.loads((out / "classes.json").read_text()) == ["oriented"]
