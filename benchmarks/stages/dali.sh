# timeout: 420
# kit: dali
# data: oddjpegs
# about: DALI loader: the GPU graph vs the CPU graph (cuda tests); the 287 odd files' converter list decoded by the mixed decoder at hw_decoder_load 0 and 1; bench loader --loader dali (hw_decoder_load 0, 0.65, 1) on 10,000 generated 500x375 JPEGs vs torchvision (a worker per core) and DALI's own colour ops
# Writes $OUT/dali-odd.json (per hw_decoder_load: files listed, decoded, the error if any) as soon as the
# odd files are done, the cuda tests' output to the log, then $OUT/dali-loader.json (bench loader's rows, saved after each row).
set -uo pipefail
data=${FASTBYOL_SHARED_DATA:-../shared/data}
work=$(mktemp -d)
rc=0

# 1. The converter's list of the odd files through the mixed decoder: no file may stop the pipeline.
python3 -m fastbyol.convert "$data/oddjpegs" --to dali --out "$work/odd-dali" --workers 8 | tail -4
python3 - "$work/odd-dali" "$OUT/dali-odd.json" <<'PY' || rc=1
import json, sys, time
from fastbyol import InputError
from fastbyol.pipelines.dali import DaliEvalLoader
out, result, failed = sys.argv[1], {}, False
for load in (0.0, 1.0):
    t0, decoded, error = time.perf_counter(), 0, None
    try:
        crops = DaliEvalLoader(out, "train", image_size=32, small=True, batch_size=64, device="cuda",
                               workers=4, hw_decoder_load=load)
        for images, labels, index in crops:
            decoded += len(index)
        listed = len(crops.indices)
    except InputError as err:
        error, failed = str(err), True
        listed = None
    result[str(load)] = dict(listed=listed, decoded=decoded, error=error,
                             seconds=round(time.perf_counter() - t0, 2))
    print(f"hw_decoder_load {load}: {result[str(load)]}", flush=True)
json.dump(result, open(sys.argv[2], "w"), indent=1)
sys.exit(1 if failed else 0)
PY

# 2. The GPU graph against the CPU graph (same batches and parameters; pixel differences printed)
PYTHONUNBUFFERED=1 timeout 120 python3 -m pytest -m cuda -q -s -p no:cacheprovider -rA \
  tests/test_dali_loader.py || rc=1

# 3. The benchmark folder, made here from the carried photos, and the loader benchmark on it.
python3 benchmarks/make_bench_folder.py "$work/bench" --count 10000 \
  --photos "$data/oddjpegs/dali_extra/single/jpeg" || rc=1
python3 -m fastbyol.bench loader --data "$work/bench" --loader dali --hw-decoder-load 0 0.65 1 \
  --baselines torchvision,dali-colour --batch-size 256 --image-size 224 --batches 30 --warmup 5 \
  --json "$OUT/dali-loader.json" || rc=1
rm -rf "$work"
exit $rc
