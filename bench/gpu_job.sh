#!/bin/bash
# GPU-host job: export the cuda-sm90 library there (cubin), check every kernel against the float64
# reference, load it with the runtime-only TVM on torch tensors, check lntune.torch's forward and
# gradients (bench/torch_check.py), then benchmark. Results go to $OUT.
# Run after `. .devbundle/b/env.sh` (a fresh host; bench/device_bundle.sh says how TVM gets there)
# or `. /tmp/tvm_site/env.sh` (a warm one).
#   usage: bash bench/gpu_job.sh [export|bench ARGS...|step ARGS...|reliability]
#     export            export + check + runtime-only load into $LIB
#     step ARGS...      `lntune bench --step` (module forward+backward against torch, torch.compile,
#                       Liger) on the library in $LIB, results in $OUT
#     bench ARGS...     export + check, then `lntune bench $LIB ARGS...` (always a fresh export, so the
#                       library benchmarked is the one today's tuning_logs give)
#     reliability       bench/reliability_gpu.py: 2**31 elements, determinism across processes, int32
#                       vs int64 indexing
set -euo pipefail
HIDDEN=${HIDDEN:-768,1024,2048,4096,5120,8192,16384}
DTYPES=${DTYPES:-float32,bfloat16,float16,bfloat16:float32,float16:float32}
OUT=${OUT:-/tmp/lntune-out}
LIB=${LIB:-/tmp/lntune-lib}
mkdir -p "$OUT"

export_and_check() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
  python3 -m lntune export --target cuda-sm90 --hidden "$HIDDEN" --dtype "$DTYPES" -o "$LIB" 2>&1 | grep -v Warning
  cp "$LIB/manifest.json" "$OUT/manifest.json"
  python3 -m lntune check "$LIB" --rows 1,37,4099 > "$OUT/check.txt"
  tail -1 "$OUT/check.txt"
  # The runner with the TVM runtime alone (no compiler library), on torch CUDA tensors.
  TVM_USE_RUNTIME_LIB=1 python3 - "$LIB" <<'PY' | tee -a "$OUT/check.txt"
import sys, time
t0 = time.time()
import torch, tvm, lntune
assert tvm.base._RUNTIME_ONLY, "expected the runtime-only TVM"
lib = lntune.load(sys.argv[1])
n, dt, _ = lib.variants[0]
x = torch.randn(4099, n, device="cuda").to(getattr(torch, dt)) + 3
g, b = torch.ones(n, device="cuda", dtype=x.dtype), torch.zeros(n, device="cuda", dtype=x.dtype)
y, mean, rstd = lib.forward(x, g, b)
dx, dg, db = lib.backward(torch.randn_like(x), x, mean, rstd, g)
ref = torch.nn.functional.layer_norm(x.double(), (n,))
print(f"runtime-only load+forward+backward ok on {y.device}: N={n} {dt} max|y-ref|={float((y.double()-ref).abs().max()):.2e} "
      f"({time.time() - t0:.1f}s incl. import)")
PY
  # lntune.torch's autograd path on CUDA (side stream) against float64, also runtime-only.
  TVM_USE_RUNTIME_LIB=1 python3 bench/torch_check.py "$LIB" --hidden "${HIDDEN%%,*}" 2>&1 | grep -v Warning \
    | tee -a "$OUT/check.txt"
}

case "${1:-export}" in
  export) export_and_check ;;
  bench)
    shift
    rm -rf "$LIB"
    export_and_check
    python3 -m lntune bench "$LIB" --out "$OUT" "$@" 2>&1 | grep -v Warning ;;
  step)
    shift
    python3 -m lntune bench --step "$LIB" --out "$OUT" "$@" 2>&1 | grep -v Warning ;;
  reliability) python3 bench/reliability_gpu.py "$OUT" 2>&1 | grep -v Warning ;;
esac
