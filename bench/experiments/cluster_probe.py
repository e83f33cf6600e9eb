"""Does TVM 0.27 build and launch a thread-block cluster? The first step towards a 2-CTA cluster per
row for N = 16384 (bench/NOTES.md).

    python3 bench/experiments/cluster_probe.py

Binds a split of the row loop to `clusterCtaIdx.x` (cluster size 2) in a toy elementwise kernel and
prints what the CUDA source does with it. Seen on the CPU machine (2026-11-26): TVM accepts the
binding and reads the rank with `mov.u32 %0, %%cluster_ctarank`; its CUDA runtime library names
`clusterCtaIdx.` as a launch parameter and checks grid divisibility by the cluster size, so the
launch itself should set the cluster dimension. Where a GPU is visible it also runs the kernel and
checks every output element (outputs poisoned with NaN first), which is the part not yet seen.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ROWS, COLS, CLUSTER = 256, 64, 2


def build():
    import tvm
    from tvm import te

    from lntune.build import compile_module
    from schedules.targets import get_target

    a = te.placeholder((ROWS, COLS), name="A")
    b = te.compute((ROWS, COLS), lambda i, j: a[i, j] * 2.0, name="B")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    row, col = sch.get_loops(sch.get_sblock("B"))
    cluster, rank = sch.split(row, [None, CLUSTER])
    sch.bind(cluster, "blockIdx.x")
    sch.bind(rank, "clusterCtaIdx.x")
    sch.bind(col, "threadIdx.x")
    mod = tvm.IRModule({"probe": sch.mod["main"].with_attr("global_symbol", "probe")})
    return compile_module(mod, get_target("cuda-sm90"))


def main() -> None:
    import tvm

    from lntune.toolchain import cuda_driver_present

    lib = build()
    source = lib.mod.imports[0].inspect_source()
    print("cluster rank read in the kernel:", "%cluster_ctarank" in source)
    if not cuda_driver_present():
        print("no CUDA driver here: built, not run")
        return
    device = tvm.cuda(0)
    x = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype("float32") + 3
    y = tvm.runtime.tensor(np.full((ROWS, COLS), np.nan, "float32"), device)
    lib.mod["probe"](tvm.runtime.tensor(x, device), y)
    got = y.numpy()
    print(f"ran: {int(np.isnan(got).sum())} elements unwritten, max error {float(np.nanmax(abs(got - 2 * x))):.1e}")


if __name__ == "__main__":
    main()
