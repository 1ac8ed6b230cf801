# timeout: 560
# kit: ffcv
# data: oddjpegs/dali_extra/single/jpeg cifar10-train-jpg.tar.gz cifar10-val-jpg.tar.gz
# about: FFCV loader img/s at 224 (cpu decode: designs a and b; --ffcv-decode gpu) vs FFCV's stock two-view pipeline, on the 10k benchmark folder as .beton; a 1.8-minute ResNet-18 budget (start-up, compilation and k-NN included) on CIFAR-10 from .beton, k-NN vs random init
# Writes $OUT/ffcv-loader.json (one row per variant, saved as each ends) and $OUT/ffcv-train-cifar10.json;
# the CUDA tests' outcome and MADs are in the stage's log.
set -uo pipefail
data=${FASTBYOL_SHARED_DATA:-../shared/data}
work=$(mktemp -d)
rc=0

# 0. The FFCV loader's CUDA tests (views on the device, nvJPEG) against the reference loader.
PYTHONUNBUFFERED=1 timeout 90 python3 -m pytest -m cuda -q -s -p no:cacheprovider -rA tests/test_ffcv_loader.py || rc=1

# 1. The benchmark folder (10,000 JPEGs around 500x375), converted to .beton once (bench loader's
#    DIR-ffcv convention), then each loader variant and the stock baseline, batch 256, 16 threads.
python3 benchmarks/make_bench_folder.py "$work/bench" --count 10000 --photos "$data/oddjpegs/dali_extra/single/jpeg" || rc=1
# (The same script runs on the CPU with smaller numbers: ARGS = DIR JSON BATCH BATCHES WARMUP.)
PYTHONUNBUFFERED=1 timeout 220 python3 - "$work/bench" "$OUT/ffcv-loader.json" 256 20 3 <<'PY' || rc=1
import argparse, os, sys, traceback
from pathlib import Path
import torch
from fastbyol.bench import loader as bench_loader
from fastbyol.bench.ffcv_stock import run_stock
from fastbyol.bench.record import Recorder, device_name
data, out, batch, batches, warmup = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
workers = len(os.sched_getaffinity(0))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
args = argparse.Namespace(data=data, batch_size=batch, image_size=224, batches=batches, warmup=warmup,
                          workers=workers, device=str(device), precision="bf16")
recorder = Recorder("loader", "benchmarks/stages/ffcv.sh (loader part)", out)
result = dict(name=f"ffcv-{device_name(device)}", device=device_name(device), batch_size=batch, image_size=224,
              workers=workers, batches=batches, warmup=warmup, rows=[])
# After the host-only rows: os_cache first, then the page-cached variants (the os_cache fix in
# benchmarks/ffcv.md is checked by the later pipelines compiling in the same process).
variants = [("ours: ffcv, cpu decode, (a), os_cache", dict(crop_on="device", os_cache=True)),
            ("ours: ffcv, cpu decode, (a) decoded images to the device", dict(crop_on="device")),
            ("ours: ffcv, cpu decode, (b) views resized in numba", dict(crop_on="cpu")),
            ("ours: ffcv, --ffcv-decode gpu (nvJPEG)", dict(ffcv_decode="gpu"))]
# The host's side alone of designs (a) and (b) (what chose (a) on the CPU; benchmarks/ffcv.md).
host_only = [(f"host side only, {name}", dict(host_only=crop_on))
             for name, crop_on in (("(a) decoded images", "device"), ("(b) views resized in numba", "cpu"))]
for path, options in host_only + variants + [("baseline: ffcv-stock (two decodes, batch-wide colour)", None)]:
    row = dict(path=path, options=options, img_per_s=None, startup_s=None, note="")
    try:
        converted = bench_loader._converted(Path(data), "ffcv", workers)  # DIR-ffcv, once
        if options and "host_only" in options:
            row.update(bench_loader.ffcv_host_rate(args, workers, options["host_only"]))
        elif options is None:
            stock = run_stock(argparse.Namespace(**{**vars(args), "data": str(converted)}))
            row.update(img_per_s=stock["img_per_s"], startup_s=stock["startup_s"])
        else:
            row.update(bench_loader.loader_rate("ffcv", args, device, workers, **options))
    except Exception as err:
        traceback.print_exc()
        row["note"] = f"failed: {type(err).__name__}: {err}"
    print(row, flush=True)
    result["rows"].append(row)
    recorder.save(result)
PY

# 2. CIFAR-10 from .beton: a 1.8-minute ResNet-18 (small stem) budget, everything included, k-NN (5k/5k) at random init and after.
mkdir -p "$work/cifar"
for split in train val; do tar -xzf "$data/cifar10-$split-jpg.tar.gz" -C "$work/cifar"; done
python3 -m fastbyol.convert "$work/cifar" --to ffcv --out "$work/cifar-ffcv" --workers "$(nproc)" >/dev/null || rc=1
PYTHONUNBUFFERED=1 timeout 190 python3 -m fastbyol.train --data "$work/cifar-ffcv" --loader ffcv --arch resnet18 \
  --batch-size 512 --time-budget 1.8 --knn-samples 5000 --out "$work/run" || rc=1
python3 - "$work/run" "$OUT/ffcv-train-cifar10.json" <<'PY' || rc=1
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
json.dump(dict(name="ffcv-train-cifar10", summary=summary, metrics=metrics[-5:],
               knn_above_random_init=summary.get("knn_online", 0) > summary.get("knn_random_init", 100)),
          open(sys.argv[2], "w"), indent=1)
print(json.load(open(sys.argv[2]))["knn_above_random_init"], summary)
PY
rm -rf "$work"
exit $rc
