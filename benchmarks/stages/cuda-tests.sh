# timeout: 120
# kit: none
# data:
# about: pytest -m cuda: every CUDA-only test (our SyncBN over NCCL vs nn.BatchNorm, kernels and loaders on the GPU vs their CPU twins)
# A CUDA test that reads ../shared/data names its files on the data line above: gpu.sh --prepare
# carries them in .gpudata/, and gpu.sh points FASTBYOL_SHARED_DATA there.
set -uo pipefail
# Only the files that hold CUDA tests are collected: the others may import what this machine lacks.
mapfile -t files < <(grep -l "pytest.mark.cuda" tests/test_*.py)
xml=$(mktemp --suffix .xml)
PYTHONUNBUFFERED=1 python3 -m pytest -m cuda -q -p no:cacheprovider --durations=15 --junitxml="$xml" "${files[@]}"
rc=$?
python3 - "$xml" "$OUT/cuda-tests.json" "$rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
cases = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    cases.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                      seconds=float(case.get("time", 0))))
counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
json.dump(dict(exit_code=int(sys.argv[3]), counts=counts, tests=cases), open(sys.argv[2], "w"), indent=1)
print("cuda-tests:", counts)
PY
rm -f "$xml"
exit $rc
