#!/bin/bash
# One GPU-host tuning round: tune kernels for cuda-sm90 into tuning_logs/cuda-sm90 (resuming from the
# records already there) and copy the database to $OUT. Stops tuning at the time budget and still
# copies what was measured. Run after `. /tmp/tvm_site/env.sh` (bench/device_bundle.sh says how TVM gets there).
#   usage: bash bench/tune_job.sh HIDDEN DTYPES OPS TRIALS [SECONDS]
set -uo pipefail
HIDDEN=$1 DTYPES=$2 OPS=$3 TRIALS=$4 SECONDS_BUDGET=${5:-500}
OUT=${OUT:-/tmp/lntune-out}
mkdir -p "$OUT"
timeout "$SECONDS_BUDGET" python3 -m lntune tune --target cuda-sm90 --hidden "$HIDDEN" --dtype "$DTYPES" \
  --ops "$OPS" --trials "$TRIALS" --workers 16 --builder-timeout 120 2>&1 | tee "$OUT/tune.log" | grep -v "^\s*$" | tail -60
cp tuning_logs/cuda-sm90/database_workload.json tuning_logs/cuda-sm90/database_tuning_record.json "$OUT/"
wc -l "$OUT"/database_*.json
