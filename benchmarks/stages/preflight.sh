# timeout: 60
# kit: none
# data:
# about: the GPU, driver, torch, torchvision, Triton and CUDA versions
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
python3 - <<'PY' | tee "$OUT/preflight.json"
import json, platform, torch, torchvision
try:
    import triton; triton_version = triton.__version__
except ImportError:
    triton_version = None
print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__,
                      torchvision=torchvision.__version__, triton=triton_version, cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name(),
                      capability=torch.cuda.get_device_capability(), nvjpeg_decode=hasattr(torchvision.io, "decode_jpeg"))))
PY
