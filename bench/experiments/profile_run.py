"""One bfloat16 forward + backward at N = 4096 and 16384 (M*N = 2**26), for Nsight Compute to profile.

ncu --section SpeedOfLight ... -k regex:lntune_backward python3 bench/experiments/profile_run.py LIB
"""

import sys

import torch

import lntune

lib = lntune.load(sys.argv[1])
for n in (4096, 16384):
    m = (1 << 26) // n
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) + 3
    g = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.zeros_like(g)
    y, mean, rstd = lib.forward(x, g, b)
    dx, dg, db = lib.backward(torch.randn_like(x), x, mean, rstd, g)
torch.cuda.synchronize()
print("profiled run done")
