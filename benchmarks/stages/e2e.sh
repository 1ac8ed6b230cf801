# timeout: 420
# kit: none
# data: oddjpegs/dali_extra/single/jpeg
# about: bench e2e: the trainer's loop, ResNet-50 224 px b256 bf16 compiled, fed by the memory loader vs synthetic resident crops vs the torchvision reference (16 workers): img/s, stall ratio, data wait
# 12,800 linked copies of the 47 seed photos at max side 500 (50 steps an epoch); the model compiles
# once and serves the three loaders in turn (median of 3 windows of 30 steps each).
set -euo pipefail
PYTHONUNBUFFERED=1 python3 -m fastbyol.bench e2e --loader memory --replicate 12800 --arch resnet50 \
  --image-size 224 --batch-size 256 --precision bf16 --compile default --steps 30 --repeats 3 \
  --warmup 10 --json "$OUT/e2e-memory-resnet50-224px-b256-h200.json"
