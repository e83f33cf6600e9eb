"""One forward + backward per hidden size (M*N = 2**26), for Nsight Compute to profile.

    ncu --section SpeedOfLight ... -k regex:lntune_backward \
        python3 bench/experiments/profile_run.py LIB [N,N,...] [DTYPE]

Defaults: N = 4096 and 16384, bfloat16 (the third session's profile).
"""

import sys

import torch

import lntune

lib = lntune.load(sys.argv[1])
hidden = [int(n) for n in sys.argv[2].split(",")] if len(sys.argv) > 2 else [4096, 16384]
dtype = getattr(torch, sys.argv[3] if len(sys.argv) > 3 else "bfloat16")
for n in hidden:
    m = (1 << 26) // n
    x = torch.randn(m, n, device="cuda", dtype=dtype) + 3
    g = torch.randn(n, device="cuda", dtype=dtype)
    b = torch.zeros_like(g)
    y, mean, rstd = lib.forward(x, g, b)
    dx, dg, db = lib.backward(torch.randn_like(x), x, mean, rstd, g)
torch.cuda.synchronize()
print("profiled run done")
