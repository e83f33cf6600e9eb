#!/bin/bash
# One GPU-host command: export the cuda-sm90 library (cubin, built there), check it against the
# float64 reference, load it with the runtime-only TVM, and benchmark it against ATen, torch.compile
# and Liger. Everything kept goes to $OUT. Run after `. .devbundle/b/env.sh` (or /tmp/tvm_site/env.sh).
#   usage: bash bench/gpu_job.sh [hidden list] [dtype list] [elements]
set -euo pipefail
HIDDEN=${1:-768,1024,2048,4096,5120,8192,16384}
DTYPES=${2:-float32,bfloat16,float16}
ELEMENTS=${3:-67108864}
PEERS=${PEERS:-aten,compile,liger}
OUT=${OUT:-/tmp/lntune-out}
LIB=/tmp/lntune-lib
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -m lntune export --target cuda-sm90 --hidden "$HIDDEN" --dtype "$DTYPES" -o "$LIB"
python3 -m lntune check "$LIB" --rows 1,37,4099 | tee "$OUT/check.txt"
# The runner with the TVM runtime alone (no compiler library), on torch CUDA tensors.
TVM_USE_RUNTIME_LIB=1 python3 - "$LIB" <<'PY' | tee -a "$OUT/check.txt"
import sys, time
t0 = time.time()
import torch, tvm, lntune
assert tvm.base._RUNTIME_ONLY, "expected the runtime-only TVM"
lib = lntune.load(sys.argv[1])
n, dt = lib.variants[0]
x = torch.randn(4099, n, device="cuda").to(getattr(torch, dt)) + 3
g, b = torch.ones(n, device="cuda", dtype=x.dtype), torch.zeros(n, device="cuda", dtype=x.dtype)
y, mean, rstd = lib.forward(x, g, b)
ref = torch.nn.functional.layer_norm(x.double(), (n,))
print(f"runtime-only load+forward ok on {y.device}: N={n} {dt} max|y-ref|={float((y.double()-ref).abs().max()):.2e} "
      f"({time.time() - t0:.1f}s incl. import)")
PY
python3 -m lntune bench "$LIB" --elements "$ELEMENTS" --peers "$PEERS" --out "$OUT"
cp "$LIB/manifest.json" "$OUT/manifest.json"
