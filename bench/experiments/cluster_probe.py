"""Does a row reduction split over a 2-CTA cluster (schedules.cluster) build, launch and add up?

    python3 bench/experiments/cluster_probe.py

A toy with the backward's shape: each row's (sum x, sum x**2) as one pair reduction, then
y = x * sum(x**2) - sum(x). Two blocks of a cluster (blockIdx.x = rank) each reduce half of a row's
columns and write that half of y; the halves' sums meet through distributed shared memory.
On the CPU machine it builds the CUDA source and compiles it with nvcc when there is one; where a
GPU is visible it also runs it (outputs poisoned with NaN) against float64.

Seen 2026-11-26 on the H100, with the earlier version of this probe (rank bound to clusterCtaIdx.x
beside a blockIdx.x of 128): half the rows unwritten. TVM's runtime launches the blockIdx extents
as the grid and clusterCtaIdx only reads %cluster_ctarank, so the rank must be a grid axis.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ROWS, COLS, CHUNKS, THREADS = 4096, 2048, 132 * 2, 128


def schedule():
    import tvm
    from tvm import te

    from schedules import cluster
    from te_ops.layer_norm import _SUM_PAIR

    x = te.placeholder((ROWS, COLS), name="x")
    k = te.reduce_axis((0, COLS), "k")
    s1, s2 = te.compute((ROWS,), lambda i: _SUM_PAIR((x[i, k], x[i, k] * x[i, k]), axis=k), name="c")
    y = te.compute((ROWS, COLS), lambda i, j: x[i, j] * s2[i] - s1[i], name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, y]))
    rf = cluster.split_reduction(sch, "c")
    row_y, col_y = sch.get_loops(sch.get_sblock("y"))
    chunk_y, step_y = sch.split(row_y, [CHUNKS, None])
    rank_y, rest_y = sch.split(col_y, [cluster.SIZE, None])
    sch.reorder(chunk_y, rank_y, step_y, rest_y)
    row_rf, rank_rf, _ = sch.get_loops(rf)
    chunk_rf, step_rf = sch.split(row_rf, [CHUNKS, None])
    sch.reorder(chunk_rf, rank_rf, step_rf)
    chunk, rank, step = (sch.merge(a, b) for a, b in ((chunk_rf, chunk_y), (rank_rf, rank_y), (step_rf, step_y)))
    sch.compute_at(sch.get_sblock("c"), step)
    for index in (0, 1):
        sch.set_scope(rf, index, "local")
        sch.set_scope(sch.get_sblock("c"), index, "local")
    sch.bind(chunk, "blockIdx.y")
    sch.bind(rank, cluster.RANK_AXIS)
    for block in (rf, sch.get_sblock("y")):
        _, thread = sch.split(sch.get_loops(block)[-1], [None, THREADS])
        sch.bind(thread, "threadIdx.x")
    return cluster.with_cluster_exchange(sch.mod["main"]).with_attr("global_symbol", "probe")


def main() -> None:
    import tvm

    from lntune import inspect
    from lntune.build import compile_module
    from lntune.toolchain import cuda_driver_present
    from schedules.targets import get_target

    lib = compile_module(tvm.IRModule({"probe": schedule()}), get_target("cuda-sm90"))
    source = lib.mod.imports[0].inspect_source()
    print("cluster dims on the kernel:", "__cluster_dims__(2, 1, 1) probe_kernel" in source)
    if shutil.which("nvcc"):
        _, report = inspect.compile_cubin(source.encode(), "sm_90")
        print("nvcc:", inspect.ptxas_report(report))
    if not cuda_driver_present():
        print("no CUDA driver here: built, not run")
        return
    device = tvm.cuda(0)
    x = np.random.default_rng(0).standard_normal((ROWS, COLS)).astype("float32") + 0.5
    y = tvm.runtime.tensor(np.full((ROWS, COLS), np.nan, "float32"), device)
    lib.mod["probe"](tvm.runtime.tensor(x, device), y)
    got = y.numpy()
    wide = x.astype("float64")
    want = wide * (wide**2).sum(1, keepdims=True) - wide.sum(1, keepdims=True)
    error = np.linalg.norm(np.nan_to_num(got) - want) / np.linalg.norm(want)
    print(f"ran: {int(np.isnan(got).sum())} elements unwritten, relative error {error:.1e}")
    again = tvm.runtime.tensor(np.full((ROWS, COLS), np.nan, "float32"), device)
    lib.mod["probe"](tvm.runtime.tensor(x, device), again)
    print("bitwise equal on a second launch:", bool((again.numpy() == got).all()))


if __name__ == "__main__":
    main()
