"""A/B timing of the backward kernels of two source trees on the GPU (one process per tree).

    PYTHONPATH=<tree>:... python3 ab_backward.py LABEL KNOBS.json OUT.jsonl

The first tree run writes the knobs export would use for each backward kernel to KNOBS.json; a later
run with the same file reuses them, so both trees are timed with the same decisions. Each
kernel runs on M = 2**26 // N rows (past the L2), timed by TVM's time_evaluator (median of 7).
It imports only te_ops and schedules (an older tree may be just those two), so it builds its own
arguments rather than using lntune.select's.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import tvm

from schedules import database, spaces
from schedules.targets import get_target
from te_ops.layer_norm import Kernel

label, knobs_path, out_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
target = get_target("cuda-sm90")
variants = [(n, d) for d in ("float32", "bfloat16") for n in (768, 1024, 2048, 4096, 5120, 8192, 16384)]
known = json.loads(knobs_path.read_text()) if knobs_path.exists() else {}
mod, kernels = tvm.IRModule(), []
for n, dtype in variants:
    parts = spaces.parts_for(target, n, dtype)
    for op in ("backward", "backward_sum"):
        kernel = Kernel(op, n, dtype, parts)
        key = f"{op}:{n}:{dtype}"
        # The sum kernel's space differs between the trees: each takes its own choice.
        knobs = known.get(key) if op == "backward" and key in known else database.choose(kernel, target).knobs
        known.setdefault(key, knobs)
        mod[kernel.name] = database.scheduled(kernel, target, knobs)
        kernels.append(kernel)
knobs_path.write_text(json.dumps(known))
lib = tvm.compile(mod, target=tvm.target.Target(target.spec, host="llvm"))
dev = tvm.cuda(0)
torch.manual_seed(0)
with out_path.open("a") as out:
    for kernel in kernels:
        n, parts, rows = kernel.hidden, kernel.parts, (1 << 26) // kernel.hidden
        dt = getattr(torch, kernel.dtype)
        part = [torch.randn(parts, n, device="cuda") for _ in range(2)]
        if kernel.op == "backward":
            x, dy = (torch.randn(rows, n, device="cuda").to(dt) for _ in range(2))
            mean, rstd = torch.randn(rows, device="cuda"), torch.rand(rows, device="cuda") + 0.5
            args = [dy, x, mean, rstd, torch.randn(n, device="cuda").to(dt), torch.empty_like(x), *part]
        else:
            args = [*part, torch.empty(n, device="cuda", dtype=dt), torch.empty(n, device="cuda", dtype=dt)]
        args = [tvm.runtime.from_dlpack(a) for a in args]
        timer = lib.mod.time_evaluator(kernel.name, dev, number=10, repeat=7)
        us = float(np.median(timer(*args).results)) * 1e6
        row = {"label": label, "kernel": kernel.name, "rows": rows, "us": round(us, 2)}
        out.write(json.dumps(row) + "\n")
        print(row, flush=True)
