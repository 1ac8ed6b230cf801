"""The pictures users look at: preview's view grid, plot's curves, and --tensorboard's scalars. The
PNGs must be made, have their size, and not be blank."""
import json

import numpy as np
import pytest
from PIL import Image

from fastbyol import train as train_mod
from fastbyol.plot import main as plot_main
from fastbyol.preview import main as preview_main


def assert_picture(path, size, ink):
    """The PNG's size, and at least `ink` of its pixels not white: not a blank page."""
    with Image.open(path) as img:
        assert img.size == size
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    assert (pixels.min(axis=2) < 0.9).mean() > ink
    return pixels


@pytest.mark.parametrize("loader", ["torchvision", "memory"])
def test_preview_grid(loader, tiny_folder, tmp_path):
    out = tmp_path / "views.png"
    preview_main(["--data", str(tiny_folder), "--loader", loader, "--out", str(out), "--count", "4",
                  "--device", "cpu"])
    pixels = assert_picture(out, (3 * 160, 4 * 160 + 60), ink=0.3)  # pictures fill most of a grid
    assert pixels.std() > 0.1


@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train_mod.main([str(a) for a in ["--data", tiny_folder, "--out", out, "--arch", "cnn4",
                                     "--proj-hidden", 32, "--proj-dim", 16, "--batch-size", 16,
                                     "--epochs", 3, "--knn-every", 1, "--knn-samples", 32, "--knn-k", 5,
                                     "--workers", 0, "--log-every", 2, "--tensorboard"]])
    return out


def test_plot_curves(tiny_run, tmp_path):
    out = tmp_path / "curves.png"
    plot_main([str(tiny_run), "--out", str(out)])
    pixels = assert_picture(out, (1500, 800), ink=0.01)  # axes, text and lines on white
    assert ((pixels[..., 2] - pixels[..., 0]) > 0.3).mean() > 0.001  # the curves' blue is drawn


def test_tensorboard_has_the_metrics_scalars(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "tau", "probe_acc", "knn_top1", "img_per_s", "data_wait"):
        expected = [(line["step"], line[key]) for line in lines if key in line]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)
