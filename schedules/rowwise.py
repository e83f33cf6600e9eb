"""forward and forward statistics: a row (or a few rows, on threadIdx.y) per thread block, the row held
in registers after one 16-byte-vectorized read, warp-shuffle/shared-memory allreduces."""

from __future__ import annotations

from tvm import s_tir

from schedules.layout import (
    legalized_bf16,
    read_index,
    spread_row,
    store_row,
    thread_candidates,
    unroll_by_knob,
    vector_width,
)
from schedules.targets import TargetInfo
from te_ops.layer_norm import Kernel

ROWS_PER_BLOCK = (1, 2, 4, 8)
ROW_MOMENTS = ("x_sum", "x_dev")  # the forward's row reductions, in program order
ROW_STAGES = ("x_sum", "x_shift", "x_dev", "x_terms")  # ... with its per-row stages


def rows_per_block_candidates(target: TargetInfo) -> tuple[int, ...]:
    """Rows per thread block in the row-wise kernels (threadIdx.y).

    ROCm: one. With several rows, TVM's allreduce passes an int64 lane index to
    llvm.amdgcn.ds.bpermute when the row count is int64, and LLVM rejects the module.
    """
    return (1,) if target.family == "rocm" else ROWS_PER_BLOCK


def rowwise(sch: s_tir.Schedule, kernel: Kernel, target: TargetInfo, knobs) -> None:
    """forward / forward_stats: rows on blocks (and threadIdx.y), each row read once into registers."""
    gpu = target.is_gpu
    vec = vector_width(kernel, target)
    outputs = (["y"] if kernel.op == "forward" else []) + ["mean", "rstd"]
    if not legalized_bf16(kernel, target):
        sch.compute_inline(sch.get_sblock("x_f32"))  # x widened as it is read: the row cached as x
    if gpu:
        threads = knobs.pick(sch, "threads", thread_candidates(kernel, target))
        rows = knobs.pick(sch, "rows_per_block", rows_per_block_candidates(target))
        splits = [sch.split(sch.get_loops(sch.get_sblock(b))[0], [None, rows]) for b in outputs]
        row_block = sch.merge(*[s[0] for s in splits])
        row = sch.merge(*[s[1] for s in splits])
        sch.bind(row_block, "blockIdx.x")
        sch.bind(row, "threadIdx.y")
    else:
        threads = 1
        row = row_block = sch.merge(*[sch.get_loops(sch.get_sblock(b))[0] for b in outputs])
        sch.parallel(row)
    # The row's two reductions (te_ops' _row_moments: x_sum, then the pair of sums of d = x - a and
    # d**2, two outputs like the backward's "c"), and its per-row stages, once a row into registers
    # of every thread: x_shift (a, which the pair reads) and x_terms (a, sum(d) / N and
    # sum(d**2) / N, which y, mean and rstd read), not the allreduces' volatile shared results.
    for name in ROW_STAGES[::-1]:  # consumers before producers
        block = sch.get_sblock(name)
        sch.compute_at(block, row)
        for index in range(len(sch.get(block).writes)):
            sch.set_scope(block, index, "local")
        if name not in ROW_MOMENTS:
            sch.unroll(sch.get_loops(block)[-1])
    if legalized_bf16(kernel, target):
        # The row cached widened to fp32 (stage x_f32): bf16 legalization leaves loads of a local
        # bf16 buffer inside the pair reduction unrewritten (see legalized_bf16).
        x_cache = sch.get_sblock("x_f32")
        sch.compute_at(x_cache, row)
        sch.set_scope(x_cache, 0, "local")
    else:
        # Every reader of x (and below, of dy and gamma) shares the cache, so no consumer_blocks:
        # trace simplification drops the get_sblock instructions that only feed such a list.
        x_sum = sch.get_sblock("x_sum")
        x_cache = sch.cache_read(x_sum, read_index(sch, x_sum, "x"), "local")
        sch.compute_at(x_cache, row)
    spread_row(sch, x_cache, threads, vec, vectorize=True, gpu=gpu)
    for name in ROW_MOMENTS:
        spread_row(sch, sch.get_sblock(name), threads, vec, vectorize=False, gpu=gpu)
    if kernel.op == "forward":
        store_row(sch, "y", row, threads, vec, gpu, units=kernel.hidden)
    unroll_by_knob(sch, row_block, knobs)  # on CPUs too: the loop bodies over N unroll (or not)
