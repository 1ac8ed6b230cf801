#!/usr/bin/env bash
# Every GPU check as a stage, for the device machine (one H200, Python 3.12, torch 2.11 cu130, no
# registry: fastbyol runs from the checkout through PYTHONPATH, without pip).
#
#   bash benchmarks/gpu.sh --dry-run [STAGE...]   per stage: timeout, kit, data and MiB to carry
#   bash benchmarks/gpu.sh --prepare STAGE...     here: copy the stages' data into .gpudata/ (ignored)
#                                                 and print the `carry` list with its size
#   bash benchmarks/gpu.sh STAGE...               on the device: run the stages in order
#
# A stage is benchmarks/stages/<name>.sh, with header lines
#   # timeout: SECONDS       the stage is killed after that (a device call runs at most 600 s)
#   # kit: none|dali|ffcv    what ../shared/tools/devkit must have carried and unpacked first
#   # data: PATH...          files or folders under ../shared/data that it reads (carried as
#                            .gpudata/PATH), or absolute host folders (carried as .gpudata/<basename>)
#   # about: TEXT            one line on what it measures
# Each stage writes its JSON under $OUT the moment it ends, named <stage>*.json; its output goes to
# $OUT/<stage>.log and a line {stage, exit code, seconds} to $OUT/status.jsonl, so a stage that fails
# or runs out costs only itself. At most 8 files come back from a device call: one JSON per stage.
set -uo pipefail
cd "$(dirname "$0")/.."
stages_dir=benchmarks/stages
header() { sed -n "s/^# $2: //p" "$stages_dir/$1.sh" | head -1; }
all_stages() { for f in "$stages_dir"/*.sh; do basename "$f" .sh; done; }
source_of() { case "$1" in /*) echo "$1" ;; *) echo "../shared/data/$1" ;; esac; }
carried_as() { case "$1" in /*) basename "$1" ;; *) echo "$1" ;; esac; }
data_mib() {
  local total=0 path
  for path in $(header "$1" data); do
    [ -e "$(source_of "$path")" ] && total=$((total + $(du -skL "$(source_of "$path")" | cut -f1)))
  done
  echo $(( (total + 1023) / 1024 ))
}

mode=run
case "${1:-}" in
  --dry-run) mode=dry; shift ;;
  --prepare) mode=prepare; shift ;;
  -h|--help|"") sed -n '2,15p' "$0"; echo "stages: $(all_stages | tr '\n' ' ')"; exit 0 ;;
esac
stages=("$@")
[ ${#stages[@]} -gt 0 ] || mapfile -t stages < <(all_stages)
for stage in "${stages[@]}"; do
  [ -f "$stages_dir/$stage.sh" ] || { echo "gpu.sh: no stage '$stage' (have: $(all_stages | tr '\n' ' '))" >&2; exit 2; }
done

if [ $mode = dry ]; then
  printf '%-12s %8s  %-5s %6s  %s\n' stage timeout_s kit MiB "data (under ../shared/data, or absolute) / about"
  for stage in "${stages[@]}"; do
    printf '%-12s %8s  %-5s %6s  %s\n' "$stage" "$(header "$stage" timeout)" "$(header "$stage" kit)" \
      "$(data_mib "$stage")" "$(header "$stage" data) / $(header "$stage" about)"
  done
  exit 0
fi

if [ $mode = prepare ]; then
  mkdir -p .gpudata
  grep -qxF '/.gpudata/' .git/info/exclude 2>/dev/null || echo '/.gpudata/' >> .git/info/exclude
  for stage in "${stages[@]}"; do
    for path in $(header "$stage" data); do
      target=".gpudata/$(carried_as "$path")"
      mkdir -p "$(dirname "$target")"
      cp -rL "$(source_of "$path")" "$(dirname "$target")/"
    done
  done
  echo "carry: [\".gpudata\"]  ($(du -sm .gpudata | cut -f1) MiB; the limit is 64 MiB per call, tree included)"
  exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpudata ] && export FASTBYOL_SHARED_DATA="$PWD/.gpudata"
out_root=${OUT:-benchmarks/results/gpu}
mkdir -p "$out_root"
failed=0
for stage in "${stages[@]}"; do
  echo "=== stage $stage (timeout $(header "$stage" timeout) s) ==="
  start=$(date +%s)
  OUT="$out_root" timeout --kill-after 10 "$(header "$stage" timeout)" bash "$stages_dir/$stage.sh" 2>&1 \
    | tee "$out_root/$stage.log"
  rc=${PIPESTATUS[0]}
  seconds=$(( $(date +%s) - start ))
  printf '{"stage": "%s", "exit_code": %d, "seconds": %d}\n' "$stage" "$rc" "$seconds" >> "$out_root/status.jsonl"
  echo "=== stage $stage: exit $rc after $seconds s ==="
  [ "$rc" = 0 ] || failed=1
done
exit $failed
