"""The torchvision reference loader: folder scanning, decoding of odd real files, the Views contract,
sharding, determinism and resume, and bad files substituted, counted and logged."""
import logging
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

import fastbyol.pipelines.torchvision as tvp
from fastbyol import InputError
from fastbyol.kernels.augment import normalize, photometric_reference
from fastbyol.pipelines.torchvision import EvalLoader, TorchvisionLoader, decode_image, native_side
from fastbyol.views import epoch_batches, sample_view_params

ORIENTATION = "oddjpegs/dali_extra/imgcodec/jpeg/orientation"
REFTEST = "oddjpegs/jpeg_decoder/reftest/images"
TRUNCATED = "oddjpegs/derived/imagenette_church_truncated50pct.jpg"


def noise_image(seed: int, size=(48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def folder(tmp_path):
    """train/ and val/ with classes ant (7 PNG), bee (6 JPEG), cat (empty), plus hidden and
    non-image files to ignore."""
    root = tmp_path / "data"
    for split, per_class in [("train", 6), ("val", 3)]:
        for name in ("ant", "bee", "cat"):
            (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            noise_image(i).save(root / split / "ant" / f"{i}.png")
            noise_image(100 + i).save(root / split / "bee" / f"{i}.jpg", quality=90)
    noise_image(7).save(root / "train" / "ant" / "UPPER.PNG")  # extensions are case-insensitive
    noise_image(8).save(root / "train" / "ant" / ".hidden.png")
    for hidden_folder in (root / "train" / "ant" / ".thumbnails", root / "train" / ".ipynb_checkpoints"):
        hidden_folder.mkdir()
        noise_image(9).save(hidden_folder / "9.png")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def odd_folder(tmp_path, shared_data):
    """Class folders directly under the root (a train split only): real odd files and bad files."""
    root = tmp_path / "odd"
    for name in ("broken", "good", "odd"):
        (root / name).mkdir(parents=True)
    for i in range(6):
        noise_image(200 + i).save(root / "good" / f"{i}.png")
    shutil.copy(shared_data / REFTEST / "mozilla/jpg-cmyk-1.jpg", root / "odd" / "cmyk.jpg")
    shutil.copy(shared_data / REFTEST / "mozilla/jpg-gray.jpg", root / "odd" / "gray.jpg")
    shutil.copy(shared_data / ORIENTATION / "padlock-406986_640_rotate_90.jpg", root / "odd" / "exif.jpg")
    shutil.copy(shared_data / TRUNCATED, root / "broken" / "truncated.jpg")
    (root / "broken" / "empty.jpg").write_bytes(b"")
    (root / "broken" / "text.jpg").write_text("this is not a JPEG")
    return root


def bad_paths(root) -> set[str]:
    return {str(root / "broken" / name) for name in ("truncated.jpg", "empty.jpg", "text.jpg")}


def small_loader(root, **options) -> TorchvisionLoader:
    return TorchvisionLoader(root, **{"batch_size": 4, "image_size": 32, "small": True, "seed": 5,
                                      **options})


def epoch_list(loader, epoch, start_batch=0):
    return list(loader.epoch(epoch, start_batch))


def reference_views(loader, epoch, index) -> list[torch.Tensor]:
    """Both views of dataset sample `index` in `epoch`, from its keyed params and torchvision's ops
    on its own decode, normalized."""
    img = decode_image(loader.samples[index][0])
    views = []
    for view, spec in enumerate(loader.specs):
        params = sample_view_params(loader.seed, epoch, [index], view, spec, [img.shape[1]],
                                    [img.shape[2]]).row(0)
        cropped = tvp.crop_and_flip(img, params.crop.tolist(), bool(params.flip), spec.size)
        uint8 = photometric_reference(cropped, params, spec)
        views.append(normalize(uint8[None], torch.float32)[0])
    return views


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(s, t) for s, t in zip(x, y))


# ---- Scanning -----------------------------------------------------------------------------------

def test_scan_sorts_classes_keeps_empty_ones_and_ignores_non_images(folder, caplog):
    with caplog.at_level(logging.WARNING):
        loader = small_loader(folder)
    assert loader.classes == ["ant", "bee", "cat"] and loader.num_classes == 3
    names = [(p.split("/")[-2], p.split("/")[-1], label) for p, label in loader.samples]
    assert [n for n in names if n[0] == "ant"] == [("ant", f, 0) for f in
                                                    ["0.png", "1.png", "2.png", "3.png", "4.png",
                                                     "5.png", "UPPER.PNG"]]
    assert [n for n in names if n[0] == "bee"] == [("bee", f"{i}.jpg", 1) for i in range(6)]
    assert str(folder / "train" / "cat") in caplog.text


def test_class_folders_at_the_root_are_the_train_split(odd_folder):
    assert small_loader(odd_folder).classes == ["broken", "good", "odd"]
    with pytest.raises(InputError, match=str(odd_folder)):
        EvalLoader(odd_folder, "val", image_size=32, batch_size=4)


def test_missing_or_empty_input_names_the_path(tmp_path, folder):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match=str(missing)):
        small_loader(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"{empty}: no class folders"):
        small_loader(empty)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match=f"{empty}: no image files"):
        small_loader(empty)
    shutil.rmtree(folder / "val")
    with pytest.raises(InputError, match=str(folder / "val")):
        EvalLoader(folder, "val", image_size=32, batch_size=4)
    with pytest.raises(InputError, match="fewer than one global batch"):
        small_loader(folder, batch_size=7, world_size=2)


def test_native_size_is_the_largest_side(folder, odd_folder):
    assert native_side(folder) == 48
    assert native_side(odd_folder) == 640


# ---- Decoding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rotate_90", "mirror_horizontal", "mirror_horizontal_rotate_270"])
def test_exif_orientation_is_applied(shared_data, name):
    path = shared_data / ORIENTATION / f"padlock-406986_640_{name}.jpg"
    expected = np.load(path.with_suffix(".npy"))
    decoded = decode_image(str(path)).permute(1, 2, 0).numpy()
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).mean() < 3
    # Without the EXIF transpose the file's raw pixels would not match.
    raw = np.asarray(Image.open(path).convert("RGB"))
    assert raw.shape != expected.shape or np.abs(raw.astype(int) - expected).mean() > 3


def test_cmyk_and_grayscale_jpegs_become_rgb(shared_data):
    cmyk_path = shared_data / REFTEST / "mozilla/jpg-cmyk-1.jpg"
    assert Image.open(cmyk_path).mode == "CMYK"
    cmyk = decode_image(str(cmyk_path))
    assert cmyk.dtype == torch.uint8 and cmyk.shape[0] == 3
    pil_rgb = np.array(Image.open(cmyk_path).convert("RGB"))
    assert torch.equal(cmyk, torch.from_numpy(pil_rgb).permute(2, 0, 1))
    gray = decode_image(str(shared_data / REFTEST / "mozilla/jpg-gray.jpg"))
    assert gray.shape[0] == 3 and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1", "I;16"])
def test_other_modes_become_rgb(tmp_path, mode):
    path = tmp_path / "img.png"
    if mode == "I;16":
        Image.fromarray(np.full((5, 7), 0x8000, dtype=np.uint16)).save(path)
    else:
        noise_image(1, size=(7, 5)).convert(mode).save(path)
    assert Image.open(path).mode == mode
    img = decode_image(str(path))
    assert img.shape == (3, 5, 7) and img.dtype == torch.uint8
    if mode == "I;16":  # scaled to 8 bits, not clipped at 255
        assert (img == 128).all()


# ---- The Views contract -------------------------------------------------------------------------

@pytest.mark.parametrize("image_size, small", [(32, True), (64, False)])
def test_views_contract_and_keyed_views(folder, image_size, small):
    loader = small_loader(folder, image_size=image_size, small=small)
    batches = epoch_list(loader, 3)
    assert len(batches) == len(loader) == 13 // 4
    for views in batches:
        for v in (views.v1, views.v2):
            assert v.shape == (4, 3, image_size, image_size) and v.dtype == torch.float32
            assert v.is_contiguous(memory_format=torch.channels_last)
        assert views.labels.dtype == torch.int64 and views.index.dtype == torch.int64
        assert views.labels.tolist() == [loader.samples[i][1] for i in views.index.tolist()]
        assert not torch.equal(views.v1, views.v2)
    # Each view is torchvision's view of its image under params keyed by (seed, epoch, index, view).
    views = batches[0]
    for i, index in enumerate(views.index.tolist()):
        v1, v2 = reference_views(loader, 3, index)
        assert torch.equal(views.v1[i], v1) and torch.equal(views.v2[i], v2), index


@pytest.mark.parametrize("image_size, small", [(32, True), (64, False)])  # 64: blur on, 7 x 7
def test_batched_and_reference_photometric_give_the_same_views(folder, image_size, small):
    batched = epoch_list(small_loader(folder, image_size=image_size, small=small), 2)
    reference = epoch_list(small_loader(folder, image_size=image_size, small=small,
                                        photometric="reference"), 2)
    assert_same_batches(batched, reference)


def test_unknown_photometric_mode_is_an_error(folder):
    with pytest.raises(ValueError, match="photometric='fused'"):
        small_loader(folder, photometric="fused")


def test_each_sample_once_per_epoch_across_two_ranks(folder):
    ranks = [small_loader(folder, batch_size=3, world_size=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 13 // 6
    seen = [[views.index.tolist() for views in loader.epoch(1)] for loader in ranks]
    one_rank = epoch_batches(13, 6, 1, 0, seed=5, epoch=1)  # the same global batches
    for step, global_batch in enumerate(one_rank):
        assert sorted(seen[0][step] + seen[1][step]) == sorted(global_batch)
    flat = [i for rank in seen for batch in rank for i in batch]
    assert len(flat) == len(set(flat)) == 12  # disjoint; 13 truncated to 2 global batches of 6


def test_global_steps_do_not_depend_on_world_size():
    def step_sets(batch_size, world_size):
        per_rank = [epoch_batches(100, batch_size, world_size, r, seed=1, epoch=2)
                    for r in range(world_size)]
        return [sorted(sum(step, [])) for step in zip(*per_rank)]

    assert step_sets(32, 1) == step_sets(16, 2) == step_sets(8, 4)
    assert len(step_sets(32, 1)) == 3


def test_training_subset_is_fixed_and_covered_once_per_epoch(folder):
    loader = small_loader(folder, subset=8)
    assert len(loader) == 2 and len(loader.indices) == 8
    assert loader.indices == small_loader(folder, subset=8).indices != small_loader(folder).indices
    for epoch in (0, 1):
        seen = sorted(sum((v.index.tolist() for v in loader.epoch(epoch)), []))
        assert seen == loader.indices  # dataset indices, each once


def test_same_seed_and_epoch_give_identical_batches(folder):
    first = epoch_list(small_loader(folder), 4)
    assert_same_batches(first, epoch_list(small_loader(folder), 4))
    other_epoch = epoch_list(small_loader(folder), 5)
    assert [v.index.tolist() for v in first] != [v.index.tolist() for v in other_epoch]


def test_start_batch_resumes_exactly_without_decoding_skipped_batches(folder, monkeypatch):
    loader = small_loader(folder)
    full = epoch_list(loader, 6)
    decodes = []

    def counting_decode(path):
        decodes.append(path)
        return decode_image(path)

    monkeypatch.setattr(tvp, "decode_image", counting_decode)
    tail = epoch_list(loader, 6, start_batch=1)
    assert_same_batches(tail, full[1:])
    assert len(decodes) == 4 * len(tail)


# ---- Bad files ----------------------------------------------------------------------------------

def test_bad_files_are_substituted_counted_and_logged(odd_folder, caplog):
    loader = small_loader(odd_folder)  # 12 files, 3 of them bad: 3 full batches
    good = {i for i, (path, _) in enumerate(loader.samples) if path not in bad_paths(odd_folder)}
    with caplog.at_level(logging.WARNING):
        batches = epoch_list(loader, 0)
    assert [len(v.index) for v in batches] == [4, 4, 4]
    assert set(sum((v.index.tolist() for v in batches), [])) <= good
    # A stand-in's views are exactly those its own index yields.
    for views in batches:
        for i, index in enumerate(views.index.tolist()):
            v1, v2 = reference_views(loader, 0, index)
            assert torch.equal(views.v1[i], v1) and torch.equal(views.v2[i], v2), index
    assert set(loader.bad_files) == bad_paths(odd_folder)
    messages = [record.getMessage() for record in caplog.records]
    for path in bad_paths(odd_folder):
        assert sum(path in message for message in messages) == 1, path
    assert any("image file is truncated" in message for message in messages)  # with the reason

    first_counts = dict(loader.bad_files)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        epoch_list(loader, 1)
    assert caplog.text == ""  # each path is logged once per loader
    assert loader.bad_files == {path: 2 * count for path, count in first_counts.items()}


@pytest.mark.parametrize("photometric", ["batched", "reference"])
def test_two_workers_match_one_process(odd_folder, photometric):
    in_process = small_loader(odd_folder, workers=0, photometric=photometric)
    with_workers = small_loader(odd_folder, workers=2, photometric=photometric)
    assert_same_batches(epoch_list(in_process, 2), epoch_list(with_workers, 2))
    assert with_workers.bad_files == in_process.bad_files and len(with_workers.bad_files) == 3


# ---- Evaluation ---------------------------------------------------------------------------------

def test_eval_crops_small_and_large(folder):
    for small, size in [(True, 32), (False, 32)]:
        loader = EvalLoader(folder, "val", image_size=size, batch_size=4, small=small)
        batches = list(loader)
        assert len(batches) == len(loader) == 2  # 6 images
        images, labels, index = batches[0]
        assert images.shape == (4, 3, size, size) and images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == index.dtype == torch.int64
        img = decode_image(loader.samples[index[0].item()][0])
        if small:
            expected = F.resize(img, [size, size], interpolation=F.InterpolationMode.BICUBIC)
        else:  # 48x40 -> shorter side 37 (32 * 256 / 224) -> centre 32x32
            expected = F.center_crop(F.resize(img, 37, interpolation=F.InterpolationMode.BICUBIC),
                                     [size, size])
        assert torch.equal(images[:1], normalize(expected[None], torch.float32))


def test_eval_subset_is_deterministic_and_sharded_without_overlap(folder):
    def indices(**options):
        return EvalLoader(folder, "train", image_size=32, batch_size=4, small=True, **options).indices

    subset = indices(max_samples=8, seed=3)
    assert len(subset) == 8 and subset == indices(max_samples=8, seed=3) == sorted(subset)
    assert subset != indices(max_samples=8, seed=4)
    shards = [indices(max_samples=8, seed=3, world_size=3, rank=r) for r in range(3)]
    assert shards[0] + shards[1] + shards[2] == subset  # contiguous, disjoint, no padding
    loader = EvalLoader(folder, "train", image_size=32, batch_size=3, small=True, max_samples=8,
                        seed=3, world_size=3, rank=1)
    assert sum((index.tolist() for _, _, index in loader), []) == shards[1]
    assert indices() == list(range(13))


def test_sample_order_is_torchvision_imagefolders_and_the_converters(tmp_path):
    """Views are keyed by sample index, so every loader and the converter must number files alike:
    nested folders included, where sorting whole paths would differ from torchvision's walk."""
    import torchvision
    from fastbyol.convert import scan_source
    from PIL import Image
    for rel in ("cat/b.png", "cat/b/c.png", "cat/b0.png", "cat/a/z.png", "dog/x.png", "dog/x/y/z.png"):
        path = tmp_path / "train" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(path)
    classes, samples = tvp.scan_image_folder(tmp_path / "train")
    reference = torchvision.datasets.ImageFolder(tmp_path / "train")
    assert classes == reference.classes
    assert samples == [(path, label) for path, label in reference.samples]
    converted = next(split for split in scan_source(tmp_path) if split.name == "train")
    assert [str(tmp_path / rel) for rel, _ in converted.files] == [path for path, _ in samples]
