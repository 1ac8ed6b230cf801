# timeout: 360
# kit: none
# data: cifar10-train-jpg.tar.gz cifar10-val-jpg.tar.gz oddjpegs/dali_extra/single/jpeg
# about: the view engine: full-size Triton tolerance tests (photos, CIFAR-10) and the memory loader's CUDA tests, bench augment (Triton vs photometric_batched vs torchvision), 200 steps of --loader memory ResNet-18 training on CIFAR-10 (img/s, data wait)
# Writes $OUT/engine-tests.json, $OUT/engine-augment.json and $OUT/engine-train-cifar10.json, each as
# soon as its part ends; a part that fails leaves the others.
set -uo pipefail
data=${FASTBYOL_SHARED_DATA:-../shared/data}
rc=0

# 1. CUDA tests of the engine: the kernels at full size with compiled Triton, the memory loader on CUDA.
log=$(mktemp)
files=(tests/test_memory_loader.py)
[ -f tests/test_kernels_triton.py ] && files=(tests/test_kernels_triton.py "${files[@]}")
PYTHONUNBUFFERED=1 timeout 110 python3 -m pytest -m cuda -q -p no:cacheprovider --durations=10 -rA \
  "${files[@]}" 2>&1 | tee "$log"
tests_rc=${PIPESTATUS[0]}
python3 - "$log" "$OUT/engine-tests.json" "$tests_rc" <<'PY'
import json, re, sys
lines = open(sys.argv[1]).read().splitlines()
outcomes = [dict(outcome=m[1], test=m[2]) for m in (re.match(r"(PASSED|FAILED|ERROR|SKIPPED) (?:\[\d+\] )?(\S+)", l) for l in lines) if m]
json.dump(dict(exit_code=int(sys.argv[3]), summary=lines[-1] if lines else "", tests=outcomes),
          open(sys.argv[2], "w"), indent=1)
PY
rm -f "$log"
[ "$tests_rc" = 0 ] || rc=1

# 2. bench augment: crop-resize and photometric, both views at 224, batch 256.
PYTHONUNBUFFERED=1 timeout 90 python3 -m fastbyol.bench augment --json "$OUT/engine-augment.json" || rc=1

# 3. 200 steps of training on CIFAR-10 through the memory loader (decoded once onto the GPU).
work=$(mktemp -d)
tar xzf "$data/cifar10-train-jpg.tar.gz" -C "$work" && tar xzf "$data/cifar10-val-jpg.tar.gz" -C "$work"
start=$(date +%s)
PYTHONUNBUFFERED=1 timeout 140 python3 -m fastbyol.train --data "$work" --loader memory --arch resnet18 \
  --batch-size 512 --epochs 100 --stop-at-step 200 --knn-samples 2000 --log-every 20 \
  --ckpt-every 1000 --out "$work/run" 2>&1 | tr '\r' '\n' | grep -v '^BYOL: \|^decoding '
train_rc=${PIPESTATUS[0]}
python3 - "$work/run" "$OUT/engine-train-cifar10.json" "$train_rc" "$(( $(date +%s) - start ))" <<'PY'
import json, statistics, sys
from pathlib import Path
run = Path(sys.argv[1])
read = lambda name: (run / name).read_text() if (run / name).exists() else ""
steps = [m for m in map(json.loads, read("metrics.jsonl").splitlines()) if "img_per_s" in m]
config = json.loads(read("config.json") or "{}")
timed = steps[2:] or steps  # the first intervals hold compilation and warm-up
median = lambda key: statistics.median(m[key] for m in timed) if timed else None
result = dict(exit_code=int(sys.argv[3]), wall_s=int(sys.argv[4]), loader=config.get("loader"),
              data="CIFAR-10 train (50,000 JPEGs, 32 px)", arch=config.get("arch"),
              batch_size=config.get("batch_size"), steps=steps[-1]["step"] if steps else 0,
              img_per_s_median=median("img_per_s"), data_wait_median=median("data_wait"),
              intervals=steps, config=config)
json.dump(result, open(sys.argv[2], "w"), indent=1)
print("engine train:", {k: result[k] for k in ("exit_code", "steps", "img_per_s_median", "data_wait_median", "wall_s")})
PY
[ "$train_rc" = 0 ] || rc=1
rm -rf "$work"
exit $rc
