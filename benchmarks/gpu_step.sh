#!/usr/bin/env bash
# Issue 5's GPU measurement, in one device call (no DALI/FFCV needed: the views are synthetic and stay
# on the GPU). Run through the device tool from the repository root:
#   run(command="bash benchmarks/gpu_step.sh", timeout_s=600)
# The JSON comes back under $OUT; copy it to benchmarks/results/ and add its line to RESULTS.md.
set -euo pipefail
out=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
# ResNet-50 at 224, batch 256 per GPU, bf16: ours compiled, ours eager, the plain eager baseline
# (per-parameter EMA loop, reference LARS, fp32, no compile), EMA/LARS microbenchmarks and the
# 1-rank NCCL SyncBatchNorm check, all in one run.
python3 -m fastbyol.bench step --arch resnet50 --image-size 224 --batch-size 256 --precision bf16 \
  --compile default --steps 30 --warmup 5 --syncbn --json "$out/step-resnet50-h100.json"
