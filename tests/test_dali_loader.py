"""The DALI loader on DALI's CPU graph, against the reference loader (PIL decode, torchvision ops) and
the shared sampler: same order and parameters, close pixels, one decode, every sample once, exact
resume, the errors, the odd files, and a short training run.

Data: 1,000 + 200 CIFAR-10 JPEGs and the 47 photos, each converted once (module-scoped); the odd
files converted once. DALI pipeline builds cost about a second: tests share the loaders they can.
"""
import collections
import json
import os
import shutil
import sys
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from fastbyol import InputError  # noqa: E402
from fastbyol.convert import convert  # noqa: E402
from fastbyol.dali_lists import read_split  # noqa: E402
from fastbyol.kernels.crop_resize import crop_and_flip  # noqa: E402
from fastbyol.pipelines import torchvision as reference  # noqa: E402
from fastbyol.pipelines.dali import DaliEvalLoader, DaliLoader, decoders_in, native_side  # noqa: E402
from fastbyol.views import byol_view_specs, epoch_batches, sample_view_params  # noqa: E402

PIXEL_MAD = 0.3  # mean abs difference (uint8) of DALI's geometric views to crop_and_flip's
CIFAR_TRAIN, CIFAR_VAL = 100, 20  # images per class


def extract_cifar(shared_data, root, per_class):
    for split, count in (("train", per_class[0]), ("val", per_class[1])):
        taken = collections.Counter()
        with tarfile.open(shared_data / f"cifar10-{split}-jpg.tar.gz") as tar:
            for member in tar:
                cls = member.name.split("/")[1] if member.isfile() else None
                if cls and taken[cls] < count:
                    taken[cls] += 1
                    (root / member.name).parent.mkdir(parents=True, exist_ok=True)
                    (root / member.name).write_bytes(tar.extractfile(member).read())
    return root


@pytest.fixture(scope="module")
def cifar(shared_data, tmp_path_factory):
    """(ImageFolder, its converter output): 1,000 train and 200 val CIFAR-10 JPEGs."""
    root = extract_cifar(shared_data, tmp_path_factory.mktemp("cifar") / "dir", (CIFAR_TRAIN, CIFAR_VAL))
    out = root.parent / "dir-dali"
    convert(root, "dali", out, workers=2)
    return root, out


@pytest.fixture(scope="module")
def photos(shared_data, tmp_path_factory):
    """(ImageFolder, its converter output): the 47 photos, 640-1920 px, in 19 classes."""
    root = tmp_path_factory.mktemp("photos") / "dir"
    shutil.copytree(shared_data / "oddjpegs/dali_extra/single/jpeg", root / "train",
                    ignore=shutil.ignore_patterns("*.txt"), copy_function=shutil.copyfile)
    out = root.parent / "dir-dali"
    convert(root, "dali", out, workers=2)
    return root, out


DATASETS = {"cifar": dict(batch_size=64, image_size=32, small=True),
            "photos": dict(batch_size=8, image_size=224, small=False)}


@pytest.fixture(scope="module")
def cifar_loader(cifar):
    return DaliLoader(cifar[1], batch_size=64, image_size=32, small=True, seed=3, workers=0)


# ---- Same order, same parameters, close pixels ---------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar", "photos"])
def test_same_order_parameters_and_close_pixels_as_the_reference(name, request):
    folder, out = request.getfixturevalue(name)
    settings = DATASETS[name]
    loader = DaliLoader(out, seed=3, workers=0, **settings)
    ref_classes, ref_samples = reference.scan_image_folder(reference.split_folder(folder, "train"))
    # nothing was skipped: list line i is the reference's sample i
    assert loader.classes == ref_classes and loader.dataset_size == len(ref_samples)
    assert [loader.files.path(i) for i in range(len(ref_samples))] == [p for p, _ in ref_samples]
    assert native_side(out) == reference.native_side(folder)
    specs = byol_view_specs(settings["image_size"], small=settings["small"])
    order = epoch_batches(len(ref_samples), settings["batch_size"], 1, 0, 3, 1)
    mads = []
    for batch, (v1, v2, p1, p2, labels, index) in enumerate(loader.geometric_batches(1)):
        assert index.tolist() == order[batch]
        assert labels.tolist() == [ref_samples[i][1] for i in order[batch]]
        images = [reference.decode_image(ref_samples[i][0]) for i in order[batch]]
        heights, widths = torch.tensor([img.shape[-2:] for img in images]).unbind(1)
        for view, (got, params) in enumerate(((v1, p1), (v2, p2))):
            expected = sample_view_params(3, 1, index, view, specs[view], heights, widths)
            for field, a, b in zip(expected._fields, params, expected):
                assert torch.equal(a, b), (view, field)
            crops = torch.stack([crop_and_flip(img, box, flip, specs[view].size) for img, box, flip
                                 in zip(images, params.crop.tolist(), params.flip.tolist())])
            assert got.shape == crops.shape and got.is_contiguous(memory_format=torch.channels_last)
            mads.append((got.int() - crops.int()).abs().float().mean().item())
        if batch == 1:
            break
    assert max(mads) <= PIXEL_MAD, mads


def test_views_follow_the_contract_and_match_the_reference_views(cifar, cifar_loader):
    folder, _ = cifar
    ref = reference.TorchvisionLoader(folder, batch_size=64, image_size=32, small=True, seed=3)
    got, want = next(iter(cifar_loader.epoch(2))), next(iter(ref.epoch(2)))
    assert torch.equal(got.index, want.index) and torch.equal(got.labels, want.labels)
    for a, b in ((got.v1, want.v1), (got.v2, want.v2)):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == (64, 3, 32, 32)
        assert a.is_contiguous(memory_format=torch.channels_last)
        # normalized units (~1/58 per uint8 step): the colour stage adds no more than resampling
        assert (a - b).abs().mean().item() < 2 * PIXEL_MAD / (255 * 0.225)


def test_one_decode_per_image(cifar_loader):
    pipe = cifar_loader.pipeline(5)
    assert decoders_in(pipe) == 1
    graph = pipe.serialize()
    assert graph.count(b"Resize") >= 2 and graph.count(b"Slice") >= 2  # two views from it


# ---- Sharding and resume ----------------------------------------------------------------------------------

def test_every_sample_once_over_two_shards(cifar):
    _, out = cifar
    seen = []
    for rank in range(2):
        loader = DaliLoader(out, batch_size=48, image_size=32, small=True, seed=1, rank=rank, world_size=2)
        assert len(loader) == 1000 // 96
        seen.append([i for *_, index in loader.geometric_batches(0) for i in index.tolist()])
    both = seen[0] + seen[1]
    assert len(both) == len(set(both)) == 96 * (1000 // 96)
    assert 1000 - len(both) < 2 * 48
    assert not set(seen[0]) & set(seen[1])


def test_resume_is_exact_and_epochs_follow_on(cifar, cifar_loader):
    _, out = cifar
    first = [batch for _, batch in zip(range(3), cifar_loader.geometric_batches(4))]
    pipe = cifar_loader._pipe
    rest = list(cifar_loader.geometric_batches(4, start_batch=3))  # where the consumer stopped
    following = next(iter(cifar_loader.geometric_batches(5)))
    assert cifar_loader._pipe is pipe  # no rebuild: the pipeline ran on into epoch 5
    assert len(first) + len(rest) == len(cifar_loader)
    # a fresh loader started in the middle of epoch 4, with a Python worker this time
    resumed = DaliLoader(out, batch_size=64, image_size=32, small=True, seed=3, workers=1)
    again = list(resumed.geometric_batches(4, start_batch=2))
    for a, b in zip([first[2], *rest, following], [*again, next(iter(resumed.geometric_batches(5)))]):
        v1, v2, p1, p2, labels, index = a
        w1, w2, q1, q2, labels2, index2 = b
        assert torch.equal(index, index2) and torch.equal(v1, w1) and torch.equal(v2, w2)
        assert all(torch.equal(x, y) for x, y in zip([*p1, *p2], [*q1, *q2]))
    # and the views themselves, from a continuing pipeline and a rebuilt one
    continued, rebuilt = next(iter(resumed.epoch(5, 1))), next(iter(cifar_loader.epoch(5, 1)))
    assert all(torch.equal(x, y) for x, y in zip(continued, rebuilt))


# ---- Evaluation ----------------------------------------------------------------------------------------

def test_eval_crops_match_the_reference(photos):
    folder, out = photos
    got = DaliEvalLoader(out, "train", image_size=224, batch_size=16, max_samples=20, seed=2)
    want = reference.EvalLoader(folder, "train", image_size=224, batch_size=16, max_samples=20, seed=2)
    assert len(got) == len(want) == 2
    for (a, la, ia), (b, lb, ib) in zip(got, want):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and a.shape == b.shape
        assert (a - b).abs().mean().item() < PIXEL_MAD / (255 * 0.225)


# ---- Odd files --------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Image appears to be a malformed MPO file")  # an odd file, on purpose
def test_the_converted_odd_files_go_through_the_cpu_graph(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd") / "dir"
    shutil.copytree(shared_data / "oddjpegs", root / "train", copy_function=shutil.copyfile)
    out = root.parent / "dir-dali"
    report = convert(root, "dali", out, workers=2)
    listed = report["splits"]["train"]["samples"]
    assert listed == report["counts"]["ok"] + report["counts"]["repaired"] > 150
    crops = DaliEvalLoader(out, "train", image_size=32, batch_size=64, small=True)
    seen = [i for _, _, index in crops for i in index.tolist()]
    assert sorted(seen) == list(range(listed))  # every listed file decoded, once
    # the recorded sizes: the reference's upright image (EXIF applied) and the file's length
    split = read_split(out, "train")
    for path, height, width, nbytes in zip(split.paths, split.heights, split.widths, split.nbytes):
        assert reference.decode_image(path).shape[1:] == (height, width), path
        assert os.path.getsize(path) == nbytes, path


# ---- Errors ----------------------------------------------------------------------------------------------

@pytest.fixture
def small_copy(cifar, tmp_path):
    """A converter output of 40 CIFAR-10 images, in a folder the test may damage."""
    folder = tmp_path / "dir"
    for path in sorted((cifar[0] / "train").glob("*/*.jpg"))[:40]:
        (folder / "train" / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / "train" / path.parent.name / path.name)
    convert(folder, "dali", tmp_path / "out", workers=1)
    return tmp_path / "out", sorted((folder / "train").glob("*/*.jpg"))


def run_one_epoch(out, **kw):
    loader = DaliLoader(out, batch_size=8, image_size=32, small=True, **kw)
    return [index for *_, index in loader.geometric_batches(0)]


def test_undecodable_file_names_it_and_points_at_the_converter(small_copy):
    out, files = small_copy
    bad = files[7]
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"not a JPEG".ljust(bad.stat().st_size - 4, b"!"))  # same length
    with pytest.raises(InputError, match=rf"^{bad}: DALI cannot decode it .*fastbyol\.convert"):
        run_one_epoch(out)


def test_files_changed_or_moved_since_the_conversion(small_copy):
    out, files = small_copy
    files[3].write_bytes(files[3].read_bytes() + b"\0")
    with pytest.raises(InputError, match=rf"^{files[3]}: \d+ bytes, \d+ when it was converted.*--overwrite"):
        run_one_epoch(out)
    files[3].unlink()
    with pytest.raises(InputError, match=rf"^{files[3]}: cannot be read"):
        run_one_epoch(out)


def test_a_worker_process_error_reaches_the_user_as_one_line():
    """DALI re-raises a parallel worker's exception as a plain Exception carrying its traceback
    (as measured on DALI 2.4; a spawned worker costs ~20 s on a loaded 2-core CI machine)."""
    from fastbyol.pipelines.dali import INPUT_ERROR_MARK, _input_error
    message = (f'Exception traceback received from worker thread:\n  File "dali.py", line 120, in read\n'
               f'    raise RuntimeError(...)\nRuntimeError: {INPUT_ERROR_MARK}/data/a.jpg: 3 bytes, 4 when it was '
               'converted\n')
    error = _input_error(Exception(message))
    assert isinstance(error, InputError) and str(error) == "/data/a.jpg: 3 bytes, 4 when it was converted"
    assert _input_error(RuntimeError("Critical error in pipeline")) is None


def test_input_errors(cifar, small_copy, monkeypatch, caplog):
    folder, out = cifar
    with pytest.raises(InputError, match=r"reads a converted folder.*python -m fastbyol\.convert"):
        DaliLoader(folder, batch_size=8)
    with pytest.raises(InputError, match=r"--device cuda: CUDA is not available"):
        DaliLoader(out, batch_size=8, device="cuda")
    with pytest.raises(InputError, match=r"fewer than one global batch"):
        DaliLoader(out, batch_size=600, world_size=2)
    with pytest.raises(InputError, match=r"--hw-decoder-load 1.5"):
        DaliLoader(out, batch_size=8, hw_decoder_load=1.5)
    from fastbyol.pipelines.dali import _warn_cpu_graph
    _warn_cpu_graph.cache_clear()  # warned once per process: maybe already
    DaliLoader(out, batch_size=8)
    assert "DALI runs its CPU graph" in caplog.text
    damaged, _ = small_copy
    (damaged / "train_sizes.txt").unlink()  # an output of the converter before sizes were recorded
    with pytest.raises(InputError, match=r"train_sizes.txt: missing.*--overwrite"):
        DaliLoader(damaged, batch_size=8)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(InputError, match=r"needs NVIDIA DALI.*fastbyol\[dali\]"):
        DaliLoader(out, batch_size=8)


def test_sizes_beside_the_list(cifar):
    folder, out = cifar
    lines = (out / "val.txt").read_text().splitlines()
    sizes = (out / "val_sizes.txt").read_text().splitlines()
    assert len(lines) == len(sizes) == 10 * CIFAR_VAL
    for line, row in zip(lines[:5], sizes[:5]):
        path = folder / line.rsplit(maxsplit=1)[0]
        assert row == f"32 32 {path.stat().st_size}"
    assert "sizes" not in json.dumps(lines)  # the list stays DALI's `<path> <label>` format


# ---- It trains ---------------------------------------------------------------------------------------------

def test_one_epoch_of_training_on_1000_cifar_jpegs(cifar, tmp_path):
    from fastbyol import train as train_mod
    _, out = cifar
    run = tmp_path / "run"
    train_mod.main(["--loader", "dali", "--data", str(out), "--out", str(run), "--arch", "cnn4",
                    "--epochs", "1", "--batch-size", "100", "--knn-samples", "500", "--workers", "0",
                    "--log-every", "2", "--proj-hidden", "64", "--proj-dim", "32"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


# ---- On the GPU (benchmarks/stages/dali.sh runs these, with the DALI kit) ---------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("hw_decoder_load", [0.0, 1.0])
def test_gpu_graph_matches_the_cpu_graph(photos, hw_decoder_load):
    """The mixed decoder (CUDA at load 0, the hardware decoder at 1) against DALI's CPU graph: the
    same batches and parameters; pixels within decoder differences (nvJPEG vs libjpeg-turbo)."""
    _, out = photos
    gpu = DaliLoader(out, batch_size=8, image_size=224, seed=3, device="cuda", workers=2,
                     hw_decoder_load=hw_decoder_load)
    cpu = DaliLoader(out, batch_size=8, image_size=224, seed=3)
    for batch, (a, b) in enumerate(zip(gpu.geometric_batches(0), cpu.geometric_batches(0))):
        assert a[0].is_cuda and torch.equal(a[5], b[5]) and torch.equal(a[4], b[4])
        assert all(torch.equal(x, y) for x, y in zip([*a[2], *a[3]], [*b[2], *b[3]]))
        mad = max((a[v].cpu().int() - b[v].int()).abs().float().mean().item() for v in (0, 1))
        print(f"hw_decoder_load {hw_decoder_load}, batch {batch}: GPU vs CPU graph mean abs diff {mad:.3f}")
        assert mad <= 1.0
        if batch == 1:
            break
    views = next(iter(gpu.epoch(0)))
    assert views.v1.dtype == torch.bfloat16 and views.v1.is_cuda
    assert views.v1.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(views.v1.float()).all()
