"""The FFCV data path. For now: opening a .beton safely, and reading it back.

FFCV's own Reader trusts the file: a truncated or foreign file surfaces later as a numba KeyError, a
garbage shape or a crash inside a compiled loop. `open_beton` checks the header, the field
descriptors, the metadata and the allocation table against the file's size first, and names what is
wrong in one InputError. Every entry point here opens files through it.

The .beton files come from `python -m fastbyol.convert DIR --to ffcv`: fields `image` (RGBImageField's
format: JPEG bytes plus width and height) and `label` (IntField).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fastbyol import InputError

MAX_FIELDS = 64  # far above any real .beton; guards against reading a huge descriptor table from junk
CONVERT_HINT = "write it again with `python -m fastbyol.convert DIR --to ffcv`"


def _ffcv():
    try:
        from ffcv import reader, types
        from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE
    except (ImportError, OSError) as err:
        raise InputError(f"reading .beton files needs FFCV, which does not import ({type(err).__name__}: "
                         f"{err}); see `pip install 'fastbyol[ffcv]'`") from err
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
