# timeout: 480
# kit: none
# data: /usr/share/datasets/fashion-mnist
# about: the embedded default on a GPU: python -m fastbyol.train with no flags (resnet18 on Fashion-MNIST, a 5-minute --time-budget); curve PNG and summary
# Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist, 30 MiB) are carried as .gpudata/fashion-mnist:
# carry them in a call without the other stages' data (the limit is 64 MiB per call).
set -euo pipefail
export FASTBYOL_FASHION_MNIST="${FASTBYOL_FASHION_MNIST:-$FASTBYOL_SHARED_DATA/fashion-mnist}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export FASTBYOL_CACHE="$scratch/cache"
run="$scratch/run"
PYTHONUNBUFFERED=1 python3 -m fastbyol.train --out "$run" 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v '^BYOL: \|^decoding '
python3 -m fastbyol.plot "$run" --out "$OUT/demo-curves.png"
python3 -m fastbyol.bench e2e --from-run "$run" --json "$OUT/demo-resnet18-fashion-mnist-h200.json"
