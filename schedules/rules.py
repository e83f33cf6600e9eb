"""The rules that choose without measuring: a kernel's baseline knobs and the backward's P (its number
of row chunks), and the P values `lntune select --parts` times instead."""

from __future__ import annotations

from schedules import cpu
from schedules.knob_sets import BackwardKnobs, RowwiseKnobs, SumKnobs
from schedules.layout import thread_candidates, vector_width
from schedules.rowwise import rows_per_block_candidates
from schedules.targets import TargetInfo
from te_ops.layer_norm import Kernel


def default_knobs(kernel: Kernel, target: TargetInfo) -> dict[str, int]:
    """The baseline: knob values chosen by rule (a few vectors per thread, registers within budget)."""
    if not target.is_gpu:
        return cpu.default_knobs(kernel)
    if kernel.op == "backward_sum":
        # Measured on the H100 over every split (lntune select, 2026-11-26): 32 columns a block with
        # P split over 8 lanes (N <= 4096) or 4 (longer rows, more blocks already) took half the time
        # of the previous rule (32 x 32 lanes, or 256 columns x 1 lane past 4096; docs/performance.md,
        # section 3).
        return SumKnobs(threads=32, lanes=8 if kernel.hidden <= 4096 else 4, unroll=64).to_dict()
    if kernel.op in ("forward", "forward_stats"):
        cands = thread_candidates(kernel, target)
        vec = vector_width(kernel, target)
        threads = min(cands, key=lambda t: (abs(kernel.hidden / t / vec - 2), t))
        rows = max(1, min(rows_per_block_candidates(target)[-1], 128 // threads))
        return RowwiseKnobs(threads=threads, rows_per_block=rows, unroll=64).to_dict()
    # Rows past 16 KB: gamma stays in L1 instead of registers, and each thread owns a contiguous
    # piece of the row (see spread_row) so that the register caches stay registers.
    long_row = kernel.hidden * (4 if kernel.dtype == "float32" else 2) > 16384
    cands = thread_candidates(kernel, target, max_per_thread=32)
    threads = min(cands, key=lambda t: (abs(kernel.hidden / t - 16), -t))
    return BackwardKnobs(
        cache_rows=1,
        cache_gamma=int(not long_row),
        chunked=int(long_row),
        rows_per_step=1,
        explicit_unroll=1,
        shared_acc=0,
        threads_per_sm=0,
        stage_rows=0,
        row_scalars=0,
        prefetch=0,
        private_copies=0,
        cluster=0,
        threads=threads,
        unroll=64,
    ).to_dict()


def parts_for(target: TargetInfo, hidden: int, dtype: str) -> int:
    """P, the number of row chunks (and partial rows) in the backward, a multiple of the SM/CU count.

    Short rows give a block little to do per row, so more chunks keep more rows in flight; long rows
    have parallelism within the row, and fewer chunks keep the [P, N] partials (written once per
    chunk and re-read by the sum) small against the rows themselves.
    """
    if not target.is_gpu:
        return cpu.parts_for(target)
    row_bytes = hidden * (4 if dtype == "float32" else 2)
    waves = 8 if row_bytes <= 2048 else 4 if row_bytes <= 8192 else 2
    return waves * target.cores


PARTS_WAVES = (1, 2, 4, 8)  # P candidates, in multiples of the SM/CU count (lntune select --parts)


def parts_candidates(target: TargetInfo, blocks_per_chunk: int = 1) -> list[int]:
    """The P values `lntune select --parts` times: a few blocks per SM or CU (CPUs: the rule's only).
    A chunk of a cluster kernel is `blocks_per_chunk` blocks, so its P counts in those: at 16-bit
    N = 16384 one 1024-thread block fits an SM, and P = SMs / 2 is one wave."""
    if not target.is_gpu:
        return [parts_for(target, 1, "float32")]
    return [waves * target.cores // blocks_per_chunk for waves in PARTS_WAVES]
