#!/bin/bash
# Several `lntune select` jobs at once on a multi-GPU host. Job i runs in its own copy of the
# checkout, on GPU i and its share of the cores (select builds with one worker per core it may use),
# so each job is an independent one-GPU select and the jobs do not write each other's selection.json.
# Afterwards the entries each job changed are merged into this checkout's selection.json (the first
# job to change a kernel keeps it; a second change is reported). Run after `. /tmp/tvm_site/env.sh`.
#   usage: bash bench/parallel_select.sh 'ARGS[;ARGS...]' ['ARGS[;ARGS...]' ...]
#     each argument is one job: `lntune select --target $TARGET` (default cuda-sm90) argument lists, ';' between the
#     selects it runs in order (e.g. '--hidden 16384 --dtype bfloat16 --ops backward; --parts
#     --hidden 16384 --dtype bfloat16'). Logs: $OUT/select-job<i>.txt.
set -uo pipefail
OUT=${OUT:-/tmp/lntune-out}
WORK=${WORK:-/tmp/lntune-parallel-select}
TARGET=${TARGET:-cuda-sm90}
SELECTION=tuning_logs/$TARGET/selection.json
mkdir -p "$OUT"
rm -rf "$WORK"
jobs=$#
gpus=$(nvidia-smi -L | grep -c ^GPU)
if ((jobs > gpus)); then
  echo "parallel_select: $jobs jobs but $gpus GPUs" >&2
  exit 2
fi
cores=$(nproc)
share=$((cores / jobs))
i=0
pids=()
for job in "$@"; do
  dir=$WORK/job$i
  mkdir -p "$dir"
  tar --exclude=./.devbundle --exclude=./build --exclude=./.venv -cf - . | tar -xf - -C "$dir"
  (
    cd "$dir" || exit 1
    IFS=';' read -ra selects <<<"$job"
    pin=""
    command -v taskset >/dev/null && pin="taskset -c $((i * share))-$(((i + 1) * share - 1))"
    failed=0
    for args in "${selects[@]}"; do
      # shellcheck disable=SC2086  # one select's arguments, split on purpose
      CUDA_VISIBLE_DEVICES=$i PYTHONPATH="$dir:$PYTHONPATH" $pin \
        python3 -m lntune select --target "$TARGET" $args 2>&1 | grep -v Warning || failed=1
    done
    exit $failed
  ) >"$OUT/select-job$i.txt" &
  pids+=($!)
  i=$((i + 1))
done
failures=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "parallel_select: job $i failed (see $OUT/select-job$i.txt); its other entries are still merged" >&2; failures=$((failures + 1)); }
done
python3 - "$SELECTION" "$WORK" "$jobs" <<'PY'
import json, sys
from pathlib import Path

path, work, jobs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
before = json.loads(path.read_text())
merged, changed_by = dict(before), {}
for i in range(jobs):
    after = json.loads((work / f"job{i}" / path).read_text())
    for name, entry in after.items():
        if before.get(name) == entry:
            continue
        if name in changed_by:
            print(f"{name}: changed by jobs {changed_by[name]} and {i}; job {changed_by[name]}'s entry kept")
            continue
        merged[name], changed_by[name] = entry, i
path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
print(f"merged {len(changed_by)} changed entries from {jobs} jobs into {path}")
PY
cp "$SELECTION" "$OUT/selection.json"
exit $((failures > 0))
