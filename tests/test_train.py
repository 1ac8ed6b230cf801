"""The training loop end to end on the CPU: resume, divergence, bad flags and paths, export."""
import json

import pytest
import torch
import torchvision

from fastbyol import train as train_mod
from fastbyol import config as config_mod
from fastbyol.fashion_mnist import CLASSES, SPLITS, ensure_fashion_mnist
from fastbyol.model import small_stem
from fastbyol.step import BYOLStep

COMMON = ["--arch", "cnn4", "--proj-hidden", "64", "--proj-dim", "32", "--batch-size", "16",
          "--knn-samples", "32", "--knn-k", "5", "--workers", "0", "--log-every", "2",
          "--ckpt-every", "2"]


def run(args):
    train_mod.main([str(a) for a in args])


def test_resume_is_bit_exact(tiny_folder, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run(["--data", tiny_folder, "--epochs", 2, "--out", full, *COMMON])
    run(["--data", tiny_folder, "--epochs", 2, "--out", part, "--stop-at-step", 3, *COMMON])
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 3
    run(["--data", tiny_folder, "--resume", "--out", part, *COMMON])
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["knn_k"] == 5


def test_exported_backbone_loads_into_torchvision(tiny_folder, tmp_path):
    out = tmp_path / "r18"
    run(["--data", tiny_folder, "--epochs", 0.25, "--out", out, *COMMON, "--arch", "resnet18"])
    net = torchvision.models.resnet18()
    small_stem(net)  # 32-px images: the run used the small stem
    result = net.load_state_dict(torch.load(out / "backbone.pt"), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert json.loads((out / "config.json").read_text())["stem"] == "small"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_folder, tmp_path, monkeypatch, capsys):
    class NanFromStep5(BYOLStep):
        calls = 0

        def __call__(self, *args, **kwargs):
            metrics = super().__call__(*args, **kwargs)
            NanFromStep5.calls += 1
            return metrics * float("nan") if NanFromStep5.calls >= 5 else metrics

    monkeypatch.setattr(train_mod, "BYOLStep", NanFromStep5)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        run(["--data", tiny_folder, "--epochs", 4, "--out", out, *COMMON])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert "loss is nan within steps 5-6" in err and "checkpoint.pt" in err
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "-4"], "--batch-size -4: must be a positive integer"),
    (["--arch", "resnet9"], "--arch 'resnet9': unknown architecture"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--precision", "fp8"], "--precision 'fp8': choose bf16, fp16 or fp32"),
    (["--tau-base", "1.5"], "--tau-base 1.5: must lie in [0, 1]"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_or_empty_data_folder(tmp_path, capsys):
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            run(["--data", folder, "--out", tmp_path / "out", *COMMON])
        assert exit_info.value.code == 2
        assert str(folder) in capsys.readouterr().err


def test_existing_run_needs_resume(tiny_folder, tmp_path, capsys):
    out = tmp_path / "twice"
    run(["--data", tiny_folder, "--epochs", 1, "--stop-at-step", 1, "--out", out, *COMMON])
    with pytest.raises(SystemExit):
        run(["--data", tiny_folder, "--epochs", 1, "--out", out, *COMMON])
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["--data", tiny_folder, "--resume", "--lr", "9", "--out", out, *COMMON])
    assert "these flags differ from it: --lr" in capsys.readouterr().err


def test_fashion_mnist_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(Exception, match="apt-get install dataset-fashion-mnist"):
        ensure_fashion_mnist(tmp_path / "cache", source=tmp_path / "nowhere")


def test_fashion_mnist_folder_from_the_environment(tmp_path, monkeypatch):
    """A machine without the Debian package points FASTBYOL_FASHION_MNIST at the four IDX files."""
    import gzip
    import numpy as np
    source = tmp_path / "idx"
    source.mkdir()
    rng = np.random.default_rng(0)
    for split, (images, labels) in SPLITS.items():
        count = 12 if split == "train" else 4
        pixels, classes = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), np.arange(count) % 10
        with gzip.open(source / images, "wb") as f:  # IDX: magic (0, 0, uint8, ndim), sizes, data
            f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in pixels.shape) + pixels.tobytes())
        with gzip.open(source / labels, "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + count.to_bytes(4, "big") + classes.astype(np.uint8).tobytes())
    monkeypatch.setenv("FASTBYOL_FASHION_MNIST", str(source))
    root = ensure_fashion_mnist(tmp_path / "cache")
    assert len(list((root / "train").glob("*/*.png"))) == 12 and len(list((root / "val").glob("*/*.png"))) == 4
    assert sorted(p.name for p in (root / "train" / CLASSES[3]).iterdir()) == ["00003.png"]


def test_embedded_default_on_a_gpu_is_a_five_minute_budget():
    cfg = config_mod.resolve(config_mod.Config(), device_type="cuda", embedded=True, native_side=28)
    assert cfg.time_budget == 5.0 and cfg.arch == "resnet18" and cfg.epochs is None and cfg.steps == 0
    cpu = config_mod.resolve(config_mod.Config(), device_type="cpu", embedded=True, native_side=28)
    assert cpu.time_budget == 0 and cpu.epochs == 3.0 and cpu.arch == "cnn4"
    given = config_mod.resolve(config_mod.Config(epochs=10.0), device_type="cuda", embedded=True,
                               native_side=28)
    assert given.time_budget == 0 and given.epochs == 10.0
