"""The converter (fastbyol.convert), against the real odd files in ../shared/data/oddjpegs and CIFAR-10.

Conversions are module-scoped and shared; FFCV Loaders compile with numba (seconds each), so each
split gets one Loader.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from fastbyol import bench
from fastbyol.convert import (REPAIRED_DIR, ValidationLog, _ffcv_decodes_cleanly, convert, downscale, main,
                              read_jpeg_header)
from fastbyol.dali_lists import file_list as dali_file_list
from fastbyol.pipelines.ffcv import constant_size_loader, open_beton, read_image
from fastbyol.pipelines.torchvision import IMAGE_EXTENSIONS

pytest.importorskip("ffcv")
JPEG_TOLERANCE = 3.0  # mean abs difference on uint8
ORIENTATION = "dali_extra/imgcodec/jpeg/orientation"


def reference_decode(path) -> np.ndarray:
    """The torchvision reference: Pillow, EXIF orientation applied, RGB (uint8 HWC)."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def fit_like_beton(expected: np.ndarray, stored_shape) -> np.ndarray:
    """`expected` at the size the .beton stores, downscaled as the converter downscales: what a
    perfect conversion would hold."""
    if expected.shape == stored_shape:
        return expected
    return np.asarray(downscale(Image.fromarray(expected), (stored_shape[1], stored_shape[0])))


def folder_state(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


# ---- Every file of oddjpegs, through both targets ------------------------------------------------

@pytest.fixture(scope="module")
def odd_source(shared_data):
    return shared_data / "oddjpegs"


@pytest.fixture(scope="module")
def odd_folder(odd_source, tmp_path_factory) -> Path:
    """oddjpegs copied as an ImageFolder: DIR/train/<top-level folder as class>/..."""
    root = tmp_path_factory.mktemp("odd") / "dir"
    shutil.copytree(odd_source, root / "train", copy_function=shutil.copyfile)
    return root


@pytest.fixture(scope="module")
def odd_converted(odd_folder, tmp_path_factory):
    """Both conversions, and the source folder's state before them."""
    before = folder_state(odd_folder)
    out = tmp_path_factory.mktemp("odd-out")
    reports = {target: convert(odd_folder, target, out / target, workers=2) for target in ("ffcv", "dali")}
    return dict(before=before, out=out, reports=reports)


def enumerated_files(odd_source: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) under oddjpegs, as paths relative to DIR of the copy."""
    images, others = [], []
    for path in sorted(p for p in odd_source.rglob("*") if p.is_file()):
        rel = "train/" + path.relative_to(odd_source).as_posix()
        is_image = path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
        (images if is_image and path.parent != odd_source else others).append(rel)
    return images, others


@pytest.mark.parametrize("target", ["ffcv", "dali"])
def test_every_odd_file_is_ok_repaired_or_skipped_with_a_reason(odd_source, odd_converted, target):
    report = odd_converted["reports"][target]
    images, others = enumerated_files(odd_source)
    assert len(images) > 250  # the folder as documented: 287 image files
    listed = {f["path"]: f for f in report["files"]}
    assert len(listed) == len(report["files"])
    for rel in images:
        entry = listed.get(rel)
        if entry is not None:
            assert entry["category"] in ("repaired", "skipped"), entry
            assert entry["reason"], entry
    for rel in others:
        assert listed[rel]["category"] == "ignored"
    counts = report["counts"]
    assert counts["ok"] + counts["repaired"] + counts["skipped"] == len(images)
    assert counts["ignored"] == len(others)
    assert counts["ok"] > 0 and counts["repaired"] > 0 and counts["skipped"] > 0


@pytest.mark.parametrize("target", ["ffcv", "dali"])
def test_odd_verdicts_agree_with_the_manifest(odd_source, odd_converted, target):
    """MANIFEST.tsv records what Pillow 13 makes of each file: what it loads is usable, what it
    cannot load is skipped. Some reasons are pinned down too."""
    listed = {f["path"]: f for f in odd_converted["reports"][target]["files"]}
    with open(odd_source / "MANIFEST.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        entry = listed.get("train/" + row["path"], {"category": "ok", "reason": ""})
        pillow_loads = row["pil_load(Pillow13)"].startswith("ok")
        assert pillow_loads == (entry["category"] != "skipped"), (row["path"], entry)
    reason = lambda rel: listed["train/" + rel]["reason"]
    assert reason("jpeg_decoder/crashtest/images/empty.jpg") == "zero bytes"
    assert reason("derived/imagenette_church_truncated50pct.jpg") == "truncated"
    assert reason("jpeg_decoder/crashtest/images/max_size.jpg") == "over --max-pixels"
    assert reason("libjpeg_turbo/monkey12.jpg") == "unsupported"
    assert reason("pillow/pil_sample_cmyk.jpg") == "YCCK to RGB"
    assert reason("jpeg_decoder/reftest/images/mozilla/jpg-cmyk-1.jpg") == "CMYK to RGB"
    assert reason("pillow/hopper_gray.jpg") == "grayscale to RGB"
    assert reason("dali_extra/single/missnamed/jpeg/0/png.jpeg") == "PNG, not JPEG"
    assert reason("pillow/hopper_orientation_6.jpg") == "EXIF orientation applied"
    assert reason("libjpeg_turbo/testimgari.jpg") == "arithmetic-coded JPEG"
    assert reason("pillow/junk_jpeg_header.jpg") == "malformed JPEG header"
    assert "lossless JPEG" in reason("dali_extra/single/jpeg_lossless/0/cat-3449999_640_grayscale_8bit.jpg")


def test_the_source_folder_is_never_modified(odd_folder, odd_converted):
    assert folder_state(odd_folder) == odd_converted["before"]


def test_odd_beton_holds_every_usable_file_upright(odd_folder, odd_converted, odd_source):
    """Read back from the .beton (FFCV's decoder): the EXIF cases match their .npy within JPEG
    tolerance, and every image is the reference decode's content at the stored size."""
    out, report = odd_converted["out"] / "ffcv", odd_converted["reports"]["ffcv"]
    reader = open_beton(out / "train.beton")
    paths = (out / "train_paths.txt").read_text().splitlines()
    assert reader.num_samples == len(paths) == report["splits"]["train"]["samples"]
    classes = json.loads((out / "classes.json").read_text())
    assert classes == sorted(p.name for p in odd_source.iterdir() if p.is_dir())
    labels = reader.metadata["f1"]
    expected = {f"train/{ORIENTATION}/{npy.stem}.jpg": np.load(npy)
                for npy in sorted((odd_source / ORIENTATION).glob("*.npy"))}
    assert len(expected) == 10
    for index, rel in enumerate(paths):
        assert labels[index] == classes.index(rel.split("/")[1])
        stored = read_image(reader, index)
        assert max(stored.shape[:2]) <= 512
        if rel in expected:
            assert mad(stored, fit_like_beton(expected[rel], stored.shape)) < JPEG_TOLERANCE, rel
        reference = reference_decode(odd_folder / rel)
        if min(reference.shape[:2]) >= 16:  # tiny synthetic images lose more to 4:2:0 chroma
            assert mad(stored, fit_like_beton(reference, stored.shape)) < 4 * JPEG_TOLERANCE, rel


def test_dali_lists_decode_with_dali_and_match_the_exif_cases(odd_converted, odd_source):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types
    out = odd_converted["out"] / "dali"
    entries = dali_file_list(out, "train")
    report = odd_converted["reports"]["dali"]
    assert len(entries) == report["splits"]["train"]["samples"]
    copies = {f["copy"] for f in report["files"] if "copy" in f}
    assert len(copies) == report["counts"]["repaired"]
    for copy in copies:  # repaired copies: clean, upright baseline RGB JPEGs, under OUT/repaired/
        header = read_jpeg_header((out / copy).read_bytes())
        assert (header.frame, header.precision, header.components, header.junk) == (0xC0, 8, 3, None)
        assert header.orientation in (None, 1) and copy.startswith(REPAIRED_DIR + "/")
    for path, _ in entries:
        assert Path(path).is_file()

    # DALI cannot drop a sample at run time: every listed file must decode (here: DALI's CPU decoder)
    @pipeline_def(batch_size=1, num_threads=2, device_id=None)
    def decode_all():
        encoded, label = fn.readers.file(files=[p for p, _ in entries], labels=[l for _, l in entries])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB), label

    pipe = decode_all()
    pipe.build()
    decoded = {}
    for path, label in entries:
        image, got = pipe.run()
        assert int(np.asarray(got[0]).item()) == label
        if ORIENTATION in path:
            decoded[Path(path).name.split(".")[0]] = np.asarray(image[0])
    for npy in sorted((odd_source / ORIENTATION).glob("*.npy")):
        assert mad(decoded[npy.stem], np.load(npy)) < JPEG_TOLERANCE, npy.name


def test_the_header_fast_path_agrees_with_pillow(odd_source):
    """Files whose markers qualify them for keeping their bytes skip Pillow: check that Pillow sees
    them the same way (format, mode, size, orientation), and loads them when libjpeg-turbo does."""
    checked = 0
    for path in sorted(odd_source.rglob("*.jp*g")):
        data = path.read_bytes()
        if data[:2] != b"\xff\xd8":
            continue
        header = read_jpeg_header(data)
        if not header.keeps_original_bytes(len(data), max_side=65535):
            continue
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (header.width, header.height)), path
            assert img.getexif().get(0x0112) == header.orientation, path
            if _ffcv_decodes_cleanly(data, header.width, header.height):
                img.load()
                checked += 1
    assert checked > 50


# ---- CIFAR-10: 60k files ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cifar_folder(shared_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    for split in ("train", "val"):
        with tarfile.open(shared_data / f"cifar10-{split}-jpg.tar.gz") as tar:
            tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="module")
def cifar_ffcv(cifar_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar-out") / "ffcv"
    return out, convert(cifar_folder, "ffcv", out, workers=2)


@pytest.mark.parametrize("split", ["train", "val"])
def test_cifar_reads_back_with_ffcv_loader(cifar_folder, cifar_ffcv, split):
    from torchvision.datasets import ImageFolder
    out, report = cifar_ffcv
    folder = ImageFolder(str(cifar_folder / split))
    assert report["counts"]["skipped"] == 0 and report["splits"][split]["samples"] == len(folder)
    assert json.loads((out / "classes.json").read_text()) == folder.classes
    images, labels = [], []
    loader = constant_size_loader(out / f"{split}.beton", batch_size=2000, workers=2)
    for batch_images, batch_labels in loader:
        images.append(np.array(batch_images))
        labels.append(np.array(batch_labels).reshape(-1))
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert len(images) == len(folder) == (50_000 if split == "train" else 10_000)
    assert Counter(labels.tolist()) == Counter(folder.targets)
    assert labels.tolist() == folder.targets  # same order as ImageFolder: nothing was skipped
    diffs = np.array([mad(images[i], reference_decode(path)) for i, (path, _) in enumerate(folder.samples)])
    assert diffs.max() < JPEG_TOLERANCE, (diffs.argmax(), diffs.max())
    assert report["stored"]["original JPEG bytes"] == 60_000  # clean baseline JPEGs keep their bytes


# ---- Layouts, odd folder contents, errors ------------------------------------------------------------

@pytest.fixture
def small_folder(shared_data, tmp_path) -> Path:
    """A flat DIR/<class>/ layout: class a with a few photos, a symlinked file, a space in a name,
    a link cycle and non-image files; class b empty; class c with only a truncated file."""
    photos = shared_data / "oddjpegs" / "pillow"
    root = tmp_path / "flat"
    (root / "a" / "deeper").mkdir(parents=True)
    for name in ("hopper.jpg", "flower.jpg", "hopper_orientation_6.jpg"):
        shutil.copyfile(photos / name, root / "a" / name)
    shutil.copyfile(photos / "flower2.jpg", root / "a" / "deeper" / "with space.jpg")
    (root / "a" / "linked.jpg").symlink_to(photos / "hopper_gray.jpg")
    (root / "a" / "deeper" / "cycle").symlink_to(root / "a")
    (root / "a" / "broken.jpg").symlink_to(root / "nowhere.jpg")
    (root / "a" / ".DS_Store").write_bytes(b"\0" * 10)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b").mkdir()
    (root / "c").mkdir()
    shutil.copyfile(photos / "truncated_jpeg.jpg", root / "c" / "cut.jpg")
    (root / "README").write_text("loose file")
    return root


def test_flat_layout_symlinks_empty_classes_and_ignored_files(small_folder, tmp_path, caplog):
    report = convert(small_folder, "dali", tmp_path / "out", workers=2)
    out = tmp_path / "out"
    assert json.loads((out / "classes.json").read_text()) == ["a", "b", "c"]
    assert report["splits"]["train"]["empty_classes"] == ["b", "c"]  # warned about; labels kept
    assert sum("no usable image" in r.message for r in caplog.records if r.levelname == "WARNING") == 2
    by_path = {f["path"]: f for f in report["files"]}
    assert by_path["a/broken.jpg"]["reason"] == "unreadable"
    assert by_path["c/cut.jpg"]["reason"] == "truncated"
    assert by_path["a/.DS_Store"]["reason"] == "hidden file"
    assert by_path["a/notes.txt"]["reason"] == "not an image file name"
    assert by_path["README"]["reason"] == "not in a class folder"
    assert by_path["a/linked.jpg"]["reason"] == "grayscale to RGB"  # the link was followed
    assert by_path["a/hopper_orientation_6.jpg"]["copy"] == "repaired/a/hopper_orientation_6.jpg"
    entries = dali_file_list(out, "train")
    assert [Path(p).name for p, _ in entries] == [
        "flower.jpg", "hopper.jpg", "hopper_orientation_6.jpg", "linked.jpg", "with space.jpg"]
    assert all(label == 0 for _, label in entries)
    # the cycle was entered once: deeper/cycle/... adds no second copy of a's files
    assert report["counts"] == dict(ok=3, repaired=2, skipped=2, ignored=3)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_errors_are_one_line_naming_the_problem(tmp_path, small_folder, capsys, monkeypatch):
    code, _, err = run_cli([str(tmp_path / "missing"), "--to", "dali"], capsys)
    assert code == 2 and err.count("\n") == 1 and "missing: no such folder" in err
    (tmp_path / "noclasses").mkdir()
    (tmp_path / "noclasses" / "x.jpg").write_bytes(b"")
    code, _, err = run_cli([str(tmp_path / "noclasses"), "--to", "dali"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no class folders" in err
    (tmp_path / "afile").write_text("")
    unwritable = str(tmp_path / "afile" / "out")
    code, _, err = run_cli([str(small_folder), "--to", "dali", "--out", unwritable], capsys)
    assert code == 2 and err.count("\n") == 1 and "not writable" in err and "afile" in err
    code, _, err = run_cli([str(small_folder), "--to", "dali", "--out", str(small_folder / "out")], capsys)
    assert code == 2 and "must not be inside DIR" in err
    for module in ("ffcv", "ffcv.writer", "ffcv.fields"):
        monkeypatch.setitem(sys.modules, module, None)
    code, _, err = run_cli([str(small_folder), "--to", "ffcv", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "FFCV" in err and "libturbojpeg0-dev" in err and "libopencv-dev" in err


def test_rerun_says_complete_and_overwrite_redoes(small_folder, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_cli([str(small_folder), "--to", "ffcv", "--out", out, "--workers", "2"], capsys)[0] == 0
    first = json.loads((Path(out) / "report.json").read_text())
    code, printed, _ = run_cli([str(small_folder), "--to", "ffcv", "--out", out], capsys)
    assert code == 0 and "already holds a complete" in printed
    code, _, err = run_cli([str(small_folder), "--to", "dali", "--out", out], capsys)
    assert code == 2 and "other settings (target ffcv)" in err
    code, _, err = run_cli([str(small_folder), "--to", "ffcv", "--out", out, "--max-side", "64"], capsys)
    assert code == 2 and "other settings (max_side 512)" in err
    code, printed, _ = run_cli([str(small_folder), "--to", "ffcv", "--out", out, "--overwrite"], capsys)
    assert code == 0 and "fastbyol.convert:" in printed and "already" not in printed
    assert json.loads((Path(out) / "report.json").read_text())["counts"] == first["counts"]
    assert not any(name.endswith(".partial") for name in os.listdir(out))


def test_an_interrupted_run_resumes(cifar_folder, tmp_path, monkeypatch, caplog):
    """Interrupt the validation pass after its first batch; the rerun validates only the rest
    and writes the same outputs as an uninterrupted run."""
    source = tmp_path / "src"
    for cls in ("airplane", "cat"):
        (source / "train" / cls).mkdir(parents=True)
        for path in sorted((cifar_folder / "val" / cls).iterdir())[:40]:
            shutil.copyfile(path, source / "train" / cls / path.name)
    clean = convert(source, "ffcv", tmp_path / "clean", workers=2)

    batches, original_append = [], ValidationLog.append

    def append_then_interrupt(self, results):
        original_append(self, results)
        batches.append(len(results))
        raise KeyboardInterrupt

    monkeypatch.setattr(ValidationLog, "append", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(source, "ffcv", tmp_path / "out", workers=2)
    assert not (tmp_path / "out" / "report.json").exists()
    monkeypatch.setattr(ValidationLog, "append", original_append)
    caplog.set_level("INFO")
    resumed = convert(source, "ffcv", tmp_path / "out", workers=2)
    assert f"{batches[0]} of 80 files already validated" in caplog.text
    assert resumed["counts"] == clean["counts"]
    a, b = open_beton(tmp_path / "clean" / "train.beton"), open_beton(tmp_path / "out" / "train.beton")
    for i in range(80):
        assert np.array_equal(read_image(a, i), read_image(b, i))
    paths_file = "train_paths.txt"
    assert (tmp_path / "out" / paths_file).read_text() == (tmp_path / "clean" / paths_file).read_text()


def test_bench_convert_smoke(tmp_path):
    """CI's ~300-file run of `python -m fastbyol.bench convert`: the table and the JSON. In its own
    process, as users run it (FFCV's writer forks workers that use OpenCV, which must not have run
    threads in the parent: this test process has)."""
    result_path = tmp_path / "convert-smoke.json"
    command = [sys.executable, "-m", "fastbyol.bench", "convert", "--replicate", "300", "--workers", "2",
               "--fidelity-samples", "5", "--json", str(result_path)]
    done = subprocess.run(command, cwd=Path(bench.__file__).parents[2], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vs FFCV writer" in done.stdout
    result = json.loads(result_path.read_text())
    assert {"machine", "versions", "command", "rows", "results", "ratio_ours_vs_ffcv_writer"} <= set(result)
    assert result["results"]["ours"]["files"] == result["results"]["ffcv DatasetWriter"]["files"] == 300
    assert result["versions"]["ffcv"] == "1.0.2" and result["machine"]["usable_cpus"] >= 1
