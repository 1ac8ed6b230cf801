"""`python -m fastbyol.bench step` on the CPU: ours and the plain steps in one run, each row with its
precision, the TF32 flags, the SyncBN check first, the JSON written after each variant."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastbyol.bench import step as bench_step
from fastbyol.bench.record import Recorder

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "cnn4", "--image-size", "16", "--batch-size", "8", "--proj-hidden", "32", "--proj-dim",
        "16", "--steps", "2", "--warmup", "1"]


def test_bench_step_writes_ours_and_the_plain_rows_each_with_its_precision(tmp_path):
    out = tmp_path / "step.json"
    result = subprocess.run(
        [sys.executable, "-m", "fastbyol.bench", "step", *TINY, "--precision", "bf16", "--syncbn",
         "--json", str(out)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ours_eager" in result.stdout and "plain_fp32" in result.stdout and "img/s" in result.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == "step" and report["versions"]["torch"]
    # on the CPU the compiled row runs only when asked
    rows = {r["variant"]: r for r in report["rows"]}
    assert [v["variant"] for v in report["variants"]] == ["ours_eager", "plain", "plain_fp32"]
    assert {k: (rows[k]["precision"], rows[k]["compile"]) for k in ("ours_eager", "plain", "plain_fp32")} \
        == {"ours_eager": ("bf16", "off"), "plain": ("bf16", "off"), "plain_fp32": ("fp32", "off")}
    fused = {v["variant"]: v["fused"] for v in report["variants"]}
    assert fused == {"ours_eager": True, "plain": False, "plain_fp32": False}
    assert all(v["img_per_s"] > 0 and v["loss_finite"] for v in report["variants"])
    assert set(report["tf32"]) >= {"matmul_allow_tf32", "cudnn_allow_tf32", "float32_matmul_precision"}
    assert report["syncbn"]["matches"] and report["syncbn"]["backend"] == "gloo"
    assert report["syncbn"]["sync_bn_class"] == "fastbyol.syncbn.SyncBatchNorm"
    kernels = report["kernels"]
    assert kernels["params"] > 0 and kernels["ema_compile"] == "off" and kernels["ema_gbps"] > 0
    assert kernels["lars_twin_ms"] > 0


def test_a_failure_after_a_variant_keeps_the_checks_and_the_measured_variant(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    bench_step.add_args(parser)
    args = parser.parse_args([*TINY, "--variants", "plain,ours_eager", "--syncbn"])
    measured = bench_step._step_variant

    def second_fails(name, *rest):
        if name == "ours_eager":
            raise RuntimeError("out of memory")
        return measured(name, *rest)

    monkeypatch.setattr(bench_step, "_step_variant", second_fails)
    recorder = Recorder("step", "test", str(tmp_path / "step.json"))
    with pytest.raises(RuntimeError):
        bench_step.run(args, recorder)
    saved = json.loads((tmp_path / "step.json").read_text())
    assert saved["syncbn"]["matches"]
    assert [r["variant"] for r in saved["rows"]] == ["plain"] and saved["rows"][0]["img/s"] > 0


def test_gpu_stages_dry_run_lists_timeout_kit_and_data_and_this_issues_stages_fit_one_call():
    result = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split()[:4] == ["stage", "timeout_s", "kit", "MiB"]
    stages = {}
    for line in lines:
        name, timeout, kit, mib = line.split()[:4]
        assert kit in ("none", "dali", "ffcv") and int(mib) >= 0, line
        stages[name] = int(timeout)
    assert {"preflight", "cuda-tests", "step"} <= set(stages)
    # one device call runs at most 600 s: these three run in one call
    assert stages["preflight"] + stages["cuda-tests"] + stages["step"] <= 600
