"""bench e2e: the trainer's loop fed by each loader and by synthetic views writes the JSON the results
table is built from; the synthetic views are the photometric stage of resident crops; --from-run
turns a training run into time-to-accuracy numbers."""
import json

import numpy as np
import pytest
import torch

from fastbyol import train as train_mod
from fastbyol.bench.__main__ import main as bench_main
from fastbyol.bench.e2e import SyntheticLoader
from fastbyol.kernels.augment import normalize, photometric_reference_batch
from fastbyol.views import byol_view_specs, sample_view_params

SMALL = ["--arch", "cnn4", "--image-size", "32", "--batch-size", "16", "--proj-hidden", "32",
         "--proj-dim", "16", "--steps", "2", "--repeats", "3", "--warmup", "1", "--workers", "0",
         "--baseline-workers", "1"]
KEYS = {"device", "versions", "command", "loader", "img_per_s", "stall_ratio", "baseline"}


@pytest.mark.parametrize("loader", ["torchvision", "memory", "synthetic"])
def test_bench_e2e_writes_the_result_keys(loader, tiny_folder, tmp_path):
    out = tmp_path / "e2e.json"
    extra = [] if loader == "torchvision" else ["--no-baseline"]
    bench_main(["e2e", "--loader", loader, "--data", str(tiny_folder), *SMALL, *extra, "--json", str(out)])
    result = json.loads(out.read_text())
    assert KEYS <= set(result) and result["loader"] == loader and result["device"] == "cpu"
    main = result["paths"][0]
    assert main["loader"] == loader and len(main["windows"]) == 3 and main["metrics_finite"]
    assert result["img_per_s"] == pytest.approx(np.median([w["img_per_s"] for w in main["windows"]]), rel=1e-3)
    assert result["stall_ratio"] == pytest.approx(result["img_per_s"] / result["synthetic"]["img_per_s"], rel=1e-3)
    assert 0 <= result["data_wait"] < 1
    if loader == "torchvision":  # the baseline: the reference loader, here with 1 worker
        assert result["baseline"]["workers"] == 1 and result["baseline"]["loader"] == "torchvision"
    assert "e2e, cnn4 32 px b16" in result["results_line"]


def test_synthetic_views_are_the_photometric_stage_of_resident_crops():
    loader = SyntheticLoader(batch_size=6, image_size=16, small=True, seed=3, device="cpu",
                             dtype=torch.float32, num_classes=4, batches=2)
    views = next(iter(loader.epoch(1, start_batch=1)))
    specs = byol_view_specs(16, small=True)
    index = np.arange(6, 12)
    for v, (got, spec) in enumerate(zip((views.v1, views.v2), specs)):
        sides = torch.full((6,), 16)
        params = sample_view_params(3, 1, index, v, spec, sides, sides)
        expected = normalize(photometric_reference_batch(loader.crops[v], params, spec), torch.float32)
        assert torch.equal(got, expected)
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert views.index.tolist() == index.tolist() and len(loader) == 2


def test_from_run_reports_time_to_accuracy(tiny_folder, tmp_path):
    run = tmp_path / "run"
    train_mod.main([str(a) for a in ["--data", tiny_folder, "--out", run, "--arch", "cnn4",
                                     "--proj-hidden", 32, "--proj-dim", 16, "--batch-size", 16,
                                     "--epochs", 2, "--knn-every", 1, "--knn-samples", 32, "--knn-k", 5,
                                     "--workers", 0, "--log-every", 2]])
    out = tmp_path / "quality.json"
    bench_main(["e2e", "--from-run", str(run), "--json", str(out)])
    result = json.loads(out.read_text())
    assert KEYS | {"knn_top1", "wall_s", "minutes_to_0.80", "minutes_to_0.85"} <= set(result)
    summary = json.loads((run / "summary.json").read_text())
    assert result["knn_top1"] == summary["knn_online"] and result["wall_s"] == summary["wall_s"]
    knn = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn = [line for line in knn if "knn_top1" in line]
    assert [r["epoch"] for r in knn] == [0.0, 1.0, 2.0]  # random init, after epoch 1, at the end
    for threshold, key in ((80.0, "minutes_to_0.80"), (85.0, "minutes_to_0.85")):
        first = [r["wall_s"] / 60 for r in knn if r["knn_top1"] >= threshold]
        assert result[key] == (pytest.approx(first[0], abs=0.01) if first else None)


def test_minutes_to_is_the_first_evaluation_at_the_threshold():
    from fastbyol.bench.e2e import minutes_to
    records = [dict(wall_s=60, knn_top1=50.0), dict(wall_s=150, knn_top1=81.0),
               dict(wall_s=180, knn_top1=79.0), dict(wall_s=240, knn_top1=85.5)]
    assert minutes_to(records, 80.0) == 2.5 and minutes_to(records, 85.0) == 4.0
    assert minutes_to(records, 90.0) is None
