"""The memory loader and the device prefetcher: the reference loader's parameters and (on the CPU)
pixels, sample coverage over ranks, bad files as the reference handles them, one decode per image
shared with the evaluation loaders, the refusal of data that would not fit, a resumed run equal to
an uninterrupted one, the `auto` rule, the .beton source, and the prefetcher's single packed copy."""
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import fastbyol.pipelines as pipelines
import fastbyol.pipelines.memory as memory
import fastbyol.pipelines.torchvision as tvp
from fastbyol import InputError
from fastbyol import train as train_mod
from fastbyol.pipelines.memory import MemoryEvalLoader, MemoryLoader
from fastbyol.pipelines.prefetch import prefetch, through_one_buffer, to_device
from fastbyol.pipelines.torchvision import EvalLoader, TorchvisionLoader, decode_image
from fastbyol.views import ViewParams, epoch_batches, sample_view_params
from geometry import unnormalize

TRUNCATED = "oddjpegs/derived/imagenette_church_truncated50pct.jpg"


def noise_image(seed: int, size) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test decodes its own folders: no split decoded by an earlier test is reused."""
    memory._RESIDENT.clear()
    yield
    memory._RESIDENT.clear()


@pytest.fixture
def folder(tmp_path):
    """train/ (ant: 7 PNG, bee: 6 JPEG) and val/ (3 + 3), images of mixed sizes."""
    root = tmp_path / "data"
    for split, per_class in [("train", 6), ("val", 3)]:
        for name in ("ant", "bee"):
            (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            noise_image(i, (48 + i, 40)).save(root / split / "ant" / f"{i}.png")
            noise_image(100 + i, (36, 50 - i)).save(root / split / "bee" / f"{i}.jpg", quality=90)
    noise_image(7, (33, 61)).save(root / "train" / "ant" / "extra.png")
    return root


@pytest.fixture
def bad_folder(tmp_path, shared_data):
    """Class folders at the root: 7 good PNGs and 3 bad files (truncated, empty, not an image)."""
    root = tmp_path / "bad"
    for name in ("broken", "good"):
        (root / name).mkdir(parents=True)
    for i in range(7):
        noise_image(200 + i, (40, 30 + i)).save(root / "good" / f"{i}.png")
    shutil.copy(shared_data / TRUNCATED, root / "broken" / "truncated.jpg")
    (root / "broken" / "empty.jpg").write_bytes(b"")
    (root / "broken" / "text.jpg").write_text("this is not a JPEG")
    return root


OPTIONS = dict(batch_size=4, image_size=32, small=True, seed=5)


def batches(loader, epoch, start_batch=0):
    return list(loader.epoch(epoch, start_batch))


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert s.dtype == t.dtype and torch.equal(s, t)


# ---- The reference loader's views ---------------------------------------------------------------

@pytest.mark.parametrize("image_size, small", [(32, True), (40, False)])  # 40: blur on (5 x 5)
def test_views_are_the_reference_loaders_bit_for_bit(folder, image_size, small):
    options = dict(OPTIONS, image_size=image_size, small=small)
    views = batches(MemoryLoader(folder, **options), 3)
    assert_same_batches(views, batches(TorchvisionLoader(folder, **options), 3))
    for batch in views:
        assert batch.v1.shape == (4, 3, image_size, image_size)
        assert batch.v1.is_contiguous(memory_format=torch.channels_last)


def test_parameters_are_the_samplers_for_seed_epoch_index(folder, monkeypatch):
    """The params handed to the engine are sample_view_params of each index, with the image sizes of
    the reference decode (PIL, read here)."""
    seen, engine = [], memory.crop_views

    def record(job, specs, dtype):
        seen.append(job)
        return engine(job, specs, dtype)

    monkeypatch.setattr(memory, "crop_views", record)
    loader = MemoryLoader(folder, **dict(OPTIONS, small=False, image_size=24))
    samples = tvp.scan_image_folder(folder / "train")[1]
    list(loader.epoch(2))
    assert len(seen) == len(loader) == 3
    for job in seen:
        index = job.index.tolist()
        sizes = torch.tensor([decode_image(samples[i][0]).shape[1:] for i in index])
        assert job.labels.tolist() == [samples[i][1] for i in index]
        for view, spec in enumerate(loader.specs):
            expected = sample_view_params(5, 2, index, view, spec, sizes[:, 0], sizes[:, 1])
            for name, got, want in zip(ViewParams._fields, job.params[view], expected):
                assert torch.equal(got, want), name
    assert any(job.params[0].flip.any() and job.params[1].jitter.any() for job in seen)


def test_each_sample_once_per_epoch_over_two_ranks(folder):
    ranks = [MemoryLoader(folder, **dict(OPTIONS, batch_size=3), world_size=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 13 // 6
    seen = [[views.index.tolist() for views in loader.epoch(1)] for loader in ranks]
    for step, global_batch in enumerate(epoch_batches(13, 6, 1, 0, seed=5, epoch=1)):
        assert sorted(seen[0][step] + seen[1][step]) == sorted(global_batch)
    flat = [i for rank in seen for batch in rank for i in batch]
    assert len(flat) == len(set(flat)) == 12  # disjoint; 13 cut to 2 global batches of 6


def test_start_batch_and_subset(folder):
    loader = MemoryLoader(folder, **OPTIONS, subset=8)
    assert loader.indices == TorchvisionLoader(folder, **OPTIONS, subset=8).indices
    full = batches(loader, 6)
    assert sorted(sum((v.index.tolist() for v in full), [])) == loader.indices
    assert_same_batches(batches(loader, 6, start_batch=1), full[1:])


# ---- Bad files ----------------------------------------------------------------------------------

def test_bad_files_are_substituted_counted_and_logged_as_the_reference_does(bad_folder, caplog):
    bad = {str(bad_folder / "broken" / name) for name in ("truncated.jpg", "empty.jpg", "text.jpg")}
    with caplog.at_level(logging.WARNING):
        loader = MemoryLoader(bad_folder, **OPTIONS)
        views = batches(loader, 0) + batches(loader, 1)
    assert_same_batches(views, batches(TorchvisionLoader(bad_folder, **OPTIONS), 0)
                        + batches(TorchvisionLoader(bad_folder, **OPTIONS), 1))
    assert loader.bad_files == {path: 1 for path in bad}  # decoded once, so met once
    messages = [record.getMessage() for record in caplog.records if record.name == memory.__name__]
    assert all(sum(path in message for message in messages) == 1 for path in bad)
    assert any("image file is truncated" in message for message in messages)  # with the reason


def test_a_split_where_nothing_decodes_is_an_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jpg").write_text("no")
    with pytest.raises(InputError, match="no image in the train split decodes"):
        MemoryLoader(tmp_path, **dict(OPTIONS, batch_size=1))


# ---- Evaluation, and one decode per image ------------------------------------------------------

@pytest.mark.parametrize("small, size", [(True, 32), (False, 24)])
def test_eval_crops_are_the_reference_eval_loaders(folder, small, size):
    for split, options in [("val", {}), ("train", dict(max_samples=9, seed=3, world_size=2, rank=1))]:
        ours = list(MemoryEvalLoader(folder, split, image_size=size, batch_size=4, small=small, **options))
        theirs = list(EvalLoader(folder, split, image_size=size, batch_size=4, small=small, **options))
        assert_same_batches(ours, theirs)


def test_every_image_is_decoded_once_and_shared_with_the_eval_loaders(folder, monkeypatch):
    decoded = []

    def counting_decode(path):
        decoded.append(path)
        return decode_image(path)

    monkeypatch.setattr(tvp, "decode_image", counting_decode)
    loader = MemoryLoader(folder, **OPTIONS)
    for epoch in (0, 1):
        batches(loader, epoch)
        for split in ("train", "val"):  # as every k-NN evaluation does
            list(MemoryEvalLoader(folder, split, image_size=32, batch_size=4, small=True, max_samples=5))
    assert sorted(decoded) == sorted(str(p) for p in folder.rglob("*.*"))


def test_data_that_would_not_fit_is_refused_before_decoding(folder, monkeypatch, tmp_path, capsys):
    need = sum(3 * Image.open(p).width * Image.open(p).height for p in (folder / "train").rglob("*.*"))
    decoded = []
    monkeypatch.setattr(tvp, "decode_image", lambda path: decoded.append(path))
    monkeypatch.setattr(memory, "memory_budget", lambda device: need - 1)
    with pytest.raises(InputError) as err:
        MemoryLoader(folder, **OPTIONS)
    message = str(err.value)
    assert "\n" not in message and "--loader dali|ffcv" in message and str(folder) in message
    assert f"{need / 2**20:.1f} MiB" in message and not decoded
    monkeypatch.setattr(tvp, "decode_image", decode_image)
    monkeypatch.setattr(memory, "memory_budget", lambda device: need)
    assert MemoryLoader(folder, **OPTIONS).dataset_size == 13  # exactly enough is enough
    memory._RESIDENT.clear()
    monkeypatch.setattr(memory, "memory_budget", lambda device: 1000)
    # Through the trainer: the one-line error and exit status 2 of every InputError.
    with pytest.raises(SystemExit) as exit_:
        train_mod.main(["--data", str(folder), "--loader", "memory", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "--loader dali|ffcv" in capsys.readouterr().err


# ---- Training through fastbyol.train -------------------------------------------------------------

TRAIN = ["--loader", "memory", "--arch", "cnn4", "--proj-hidden", "32", "--proj-dim", "16", "--batch-size",
         "32", "--knn-samples", "16", "--knn-k", "5", "--workers", "0", "--log-every", "1",
         "--ckpt-every", "1", "--epochs", "2"]


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_reference_run(tiny_folder, tmp_path):
    """Stopped after step 1 of 4 (inside the first epoch) and resumed, a --loader memory run ends
    with exactly the weights of an uninterrupted run of the reference loader: the same views, the
    same order, the same resume point."""
    full, part = tmp_path / "full", tmp_path / "part"
    train_mod.main(["--data", str(tiny_folder), "--out", str(full), *TRAIN, "--loader", "torchvision"])
    train_mod.main(["--data", str(tiny_folder), "--out", str(part), "--stop-at-step", "1", *TRAIN])
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 1
    memory._RESIDENT.clear()  # as a new process would: decode again
    train_mod.main(["--data", str(tiny_folder), "--out", str(part), "--resume", *TRAIN[2:]])
    a, b = (torch.load(run / "checkpoint.pt", weights_only=False) for run in (full, part))
    assert a["step"] == b["step"] == 4
    assert (a["config"]["loader"], b["config"]["loader"]) == ("torchvision", "memory")
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert json.loads((part / "summary.json").read_text())["bad_files"] == 0


def test_auto_picks_memory_for_the_embedded_data_and_small_folders(folder, monkeypatch):
    assert pipelines.choose_loader("auto", folder, embedded=True) == "memory"
    assert pipelines.choose_loader("auto", folder, embedded=False) == "memory"
    assert pipelines.choose_loader("torchvision", folder, embedded=True) == "torchvision"
    need = memory.estimated_bytes(folder)
    actual = sum(3 * Image.open(p).width * Image.open(p).height for p in (folder / "train").rglob("*.*"))
    assert abs(need - actual) < 0.2 * actual  # 16 headers probed, 13 files counted
    monkeypatch.setattr(pipelines, "AUTO_MEMORY_MAX_BYTES", need - 1)
    assert pipelines.choose_loader("auto", folder, embedded=False) == "torchvision"


# ---- The .beton source ------------------------------------------------------------------------

def test_beton_splits_decode_like_their_source_jpegs(tmp_path):
    from fastbyol.convert import convert
    source = tmp_path / "jpegs"
    for split, count in (("train", 5), ("val", 2)):
        for name in ("a", "b"):
            (source / split / name).mkdir(parents=True)
            for i in range(count):
                noise_image(10 * i + len(name), (40 + i, 36)).save(source / split / name / f"{i}.jpg",
                                                                  quality=90)
    out = tmp_path / "beton"
    convert(source, "ffcv", out, workers=1)
    loader = MemoryLoader(out, **dict(OPTIONS, batch_size=2))
    folder = MemoryLoader(source, **dict(OPTIONS, batch_size=2))  # PIL decodes of the same files
    assert loader.num_classes == 2 and loader.dataset_size == 10
    assert memory.native_side(out) == memory.native_side(source) == 44
    ours, theirs = loader.resident, folder.resident
    assert np.array_equal(ours.labels, theirs.labels) and np.array_equal(ours.heights, theirs.heights)
    for i in range(10):
        a, b = ours.packed(np.array([i])).image(0), theirs.packed(np.array([i])).image(0)
        # FFCV's libjpeg-turbo call upsamples chroma unlike Pillow's: a few units on pure noise.
        # Another image, or the same one transposed, would be ~85 units off.
        assert a.shape == b.shape and (a.float() - b.float()).abs().mean() < 2
    views = batches(loader, 0)
    assert len(views) == 5 and views[0].v1.shape == (2, 3, 32, 32)
    evaluated = list(MemoryEvalLoader(out, "val", image_size=32, batch_size=4, small=True))
    assert [len(index) for _, _, index in evaluated] == [4]


# ---- The prefetcher ------------------------------------------------------------------------------

def test_one_buffer_carries_every_host_tensor_in_one_copy():
    params = sample_view_params(1, 2, [3, 4, 5], 0, memory.byol_view_specs(32)[0], [40, 50, 60],
                                [30, 40, 50])
    job = (params, [torch.arange(3), torch.zeros(0, 4)], torch.tensor(7.5, dtype=torch.float64), "name")
    copies = []

    def copy(staging):
        copies.append(staging.clone())
        return copies[-1]

    moved = through_one_buffer(job, copy, pin=False)
    assert len(copies) == 1 and copies[0].dtype == torch.uint8 and copies[0].dim() == 1
    assert type(moved[0]) is ViewParams and isinstance(moved[1], list) and moved[3] == "name"
    pairs = list(zip(moved[0], params)) + list(zip(moved[1], job[1])) + [(moved[2], job[2])]
    for got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == copies[0].untyped_storage().data_ptr() or got.numel() == 0
    assert to_device(job, "cpu") is job


def test_prefetch_on_the_cpu_is_a_pass_through():
    made, calls = [], []

    def jobs():
        for k in range(4):
            made.append(k)
            yield torch.full((2,), k)

    out = prefetch(jobs(), lambda job: calls.append(int(job[0])) or job * 2, "cpu")
    assert made == calls == []  # lazily
    assert next(out).tolist() == [0, 0] and made == calls == [0]  # no batch ahead on the CPU
    assert [t.tolist() for t in out] == [[2, 2], [4, 4], [6, 6]]


@pytest.mark.cuda
def test_prefetch_runs_one_batch_ahead_on_a_side_stream():
    streams, jobs_made = [], []

    def engine(job):
        streams.append(torch.cuda.current_stream())
        assert job.is_cuda
        return job.float().mul(2)

    def jobs():
        for k in range(3):
            jobs_made.append(k)
            yield torch.arange(k, k + 4)

    out = prefetch(jobs(), engine, "cuda")
    first = next(out)
    assert jobs_made == [0, 1]  # batch 1 is on its way while batch 0 is used
    assert first.tolist() == [0.0, 2.0, 4.0, 6.0] and torch.cuda.current_stream() not in streams
    assert [t.tolist()[0] for t in out] == [2.0, 4.0]


@pytest.mark.cuda
def test_memory_loader_on_cuda_is_the_cpu_loader_within_tolerance(folder):
    options = dict(OPTIONS, small=False, image_size=40, dtype=torch.float32)
    cpu = batches(MemoryLoader(folder, **options), 1)
    gpu = batches(MemoryLoader(folder, **options, device="cuda"), 1)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.labels, b.labels.cpu())
        for x, y in ((a.v1, b.v1), (a.v2, b.v2)):
            units = (unnormalize(x) - unnormalize(y.cpu())).abs()
            assert (units <= 2).float().mean() >= 0.99 and units.mean() < 0.5


@pytest.mark.cuda
@pytest.mark.parametrize("small, size", [(True, 32), (False, 24)])
def test_eval_crops_on_cuda_are_the_cpu_ones_within_tolerance(folder, small, size):
    """Small mode crops with crop_resize (the kernel's tolerance); large mode with torchvision's own
    resize on the GPU, whose CUDA path is not the CPU's: only a loose bound there."""
    options = dict(image_size=size, batch_size=4, small=small, max_samples=9, dtype=torch.float32)
    cpu = list(MemoryEvalLoader(folder, "val", **options))
    gpu = list(MemoryEvalLoader(folder, "val", **options, device="cuda"))
    for (x, labels, index), (y, gpu_labels, gpu_index) in zip(cpu, gpu):
        assert torch.equal(labels, gpu_labels.cpu()) and torch.equal(index, gpu_index.cpu())
        units = (unnormalize(x) - unnormalize(y.cpu())).abs()
        assert units.mean() < (0.5 if small else 3.0), units.mean()
