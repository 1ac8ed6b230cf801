# timeout: 420
# kit: none
# data:
# about: bench step: ResNet-50 224 px b256 bf16, ours compiled/eager vs the plain eager steps (synthetic views)
set -euo pipefail
python3 -m fastbyol.bench step --arch resnet50 --image-size 224 --batch-size 256 --precision bf16 \
  --compile default --steps 30 --warmup 5 --syncbn --json "$OUT/step-resnet50-224px-b256-h200.json"
