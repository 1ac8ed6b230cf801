"""Reading a .beton back (fastbyol.pipelines.ffcv): stock FFCV reads what the converter writes, and a
truncated or foreign file is one clear InputError, before any numba code runs."""
import shutil

import numpy as np
import pytest
from PIL import Image

from fastbyol import InputError
from fastbyol.convert import convert
from fastbyol.pipelines.ffcv import constant_size_loader, open_beton, read_image

pytest.importorskip("ffcv")


@pytest.fixture(scope="module")
def beton(shared_data, tmp_path_factory):
    """A small .beton: 24 CIFAR-sized copies of three photos, in two classes."""
    root = tmp_path_factory.mktemp("small") / "src"
    photos = sorted((shared_data / "oddjpegs" / "jpeg_decoder" / "reftest" / "images" / "mozilla").glob(
        "jpg-size-32x32.jpg")) + [shared_data / "oddjpegs" / "pillow" / "hopper.jpg"]
    for i in range(24):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photos[i % len(photos)], root / f"class{i % 2}" / f"{i:02d}.jpg")
    out = tmp_path_factory.mktemp("small-out")
    convert(root, "ffcv", out, workers=1, max_side=32)
    return out / "train.beton", root


def test_stock_ffcv_reads_our_image_field_as_rgb_image_field(beton):
    from ffcv.fields import RGBImageField
    from ffcv.reader import Reader
    path, root = beton
    reader = Reader(str(path))  # no custom_handlers: the field is recorded as RGBImageField
    assert isinstance(reader.handlers["image"], RGBImageField)
    assert reader.num_samples == 24
    ours = open_beton(path)
    first = np.asarray(Image.open(sorted((root / "class0").iterdir())[0]).convert("RGB"))
    assert np.abs(read_image(ours, 0).astype(int) - first).mean() < 3


def truncated_copy(path, tmp_path, keep) -> str:
    data = path.read_bytes()
    cut = tmp_path / f"cut-{keep}.beton"
    cut.write_bytes(data[:keep if keep >= 0 else len(data) + keep])
    return cut


@pytest.mark.parametrize("keep", [-1, -30, 4096, 100, 10])
def test_truncated_beton_is_a_clear_error(beton, tmp_path, keep):
    cut = truncated_copy(beton[0], tmp_path, keep)
    with pytest.raises(InputError, match=r"truncated \.beton|shorter than a \.beton header") as err:
        open_beton(cut)
    assert str(cut) in str(err.value)
    with pytest.raises(InputError):  # the Loader path checks before numba compiles anything
        constant_size_loader(cut, batch_size=8)


def test_foreign_files_are_a_clear_error(shared_data, tmp_path):
    jpeg = tmp_path / "photo.beton"
    shutil.copyfile(shared_data / "oddjpegs" / "pillow" / "hopper.jpg", jpeg)
    zeros = tmp_path / "zeros.beton"
    zeros.write_bytes(bytes(1 << 16))
    noise = tmp_path / "noise.beton"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.beton"
    empty.write_bytes(b"")
    for path in (jpeg, zeros, noise, empty):
        with pytest.raises(InputError, match="not an FFCV .beton file") as err:
            open_beton(path)
        assert str(path) in str(err.value)
    with pytest.raises(InputError, match="no such file"):
        open_beton(tmp_path / "missing.beton")


def test_a_damaged_allocation_table_is_a_clear_error(beton, tmp_path):
    """A .beton whose data pointers are not in its allocation table: FFCV would fail with a KeyError
    inside compiled code."""
    from ffcv.types import ALLOC_TABLE_TYPE
    damaged = tmp_path / "damaged.beton"
    data = bytearray(beton[0].read_bytes())
    reader = open_beton(beton[0])
    table_start = int(reader.header["alloc_table_ptr"])
    table = np.frombuffer(bytes(data[table_start:]), ALLOC_TABLE_TYPE).copy()
    table["ptr"] += 1
    data[table_start:] = table.tobytes()
    damaged.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged .beton"):
        open_beton(damaged)
