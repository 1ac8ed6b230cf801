"""`python -m fastbyol.bench step` on the CPU: ours and the plain baseline in one run, table + JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_step_smoke(tmp_path):
    out = tmp_path / "step.json"
    result = subprocess.run(
        [sys.executable, "-m", "fastbyol.bench", "step", "--arch", "cnn4", "--image-size", "16",
         "--batch-size", "8", "--proj-hidden", "32", "--proj-dim", "16", "--steps", "2", "--warmup", "1",
         "--variants", "ours_eager,baseline", "--json", str(out)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ours_eager" in result.stdout and "baseline" in result.stdout and "img/s" in result.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == "step" and report["versions"]["torch"]
    assert [v["variant"] for v in report["variants"]] == ["ours_eager", "baseline"]
    assert all(v["img_per_s"] > 0 and v["loss_finite"] for v in report["variants"])
    assert report["variants"][1]["fused"] is False and report["variants"][1]["precision"] == "fp32"
    kernels = report["kernels"]
    assert kernels["params"] > 0 and kernels["ema_fused_ms"] > 0 and kernels["lars_twin_ms"] > 0
