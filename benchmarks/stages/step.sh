# timeout: 330
# kit: none
# data:
# about: bench step (fits 600 s beside preflight and cuda-tests): ResNet-50 224 px b256 bf16, ours compiled (reduce-overhead) and eager vs the plain eager bf16 and fp32 steps; SyncBN 1-rank NCCL check; 0 cudagraph skips in the update
set -euo pipefail
json="$OUT/step-resnet50-224px-b256-h200.json"
# The cheap rows first: a compile that runs out of time keeps them (the JSON is written after each).
# perf_hints: the reason for any CUDA-graph skip goes into the log.
TORCH_LOGS=perf_hints PYTHONUNBUFFERED=1 python3 -m fastbyol.bench step --arch resnet50 \
  --image-size 224 --batch-size 256 --precision bf16 --compile reduce-overhead --steps 20 --warmup 3 \
  --variants plain,ours_eager,ours_compiled,plain_fp32 --syncbn --json "$json"
python3 - "$json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
assert result["syncbn"]["matches"], result["syncbn"]
compiled = next(v for v in result["variants"] if v["variant"] == "ours_compiled")
assert compiled["update_cudagraph_skips"] == 0, f"the update skipped {compiled['update_cudagraph_skips']} CUDA graphs"
print("syncbn matches; cudagraph skips: update", compiled["update_cudagraph_skips"], "forward",
      compiled["forward_cudagraph_skips"], "EMA alone", result["kernels"].get("ema_cudagraph_skips"))
PY
