"""`python -m fastbyol.bench augment` on the CPU: every path's crop-resize, photometric and both rows,
DALI's fixed-order colour row, and the JSON with the machine and versions."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_augment_writes_every_row(tmp_path):
    out = tmp_path / "augment.json"
    done = subprocess.run(
        [sys.executable, "-m", "fastbyol.bench", "augment", "--batch-size", "4", "--image-size", "16",
         "--steps", "1", "--warmup", "1", "--source-side", "48", "--dali", "--json", str(out)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "augment" and report["versions"]["torch"] and report["machine"]
    rows = {(row["path"], row["stage"]): row for row in report["rows"]}
    for path in ("photometric_batched", "torchvision per sample"):  # no Triton row on the CPU by default
        for stage in ("crop-resize", "photometric", "both"):
            assert rows[path, stage]["img_per_s"] > 0, (path, stage)
    assert not any(path == "triton" for path, _ in rows)
    assert rows["dali colour ops (fixed order)", "photometric"]["img_per_s"] > 0
