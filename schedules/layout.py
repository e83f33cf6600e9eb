"""How the kernels lay a row out over threads and vector lanes: vector widths, thread counts, a row
spread over threadIdx.x and vectors, full-width stores, the unroll knob. Shared by the row-wise, backward
and partials-sum schedules (schedules.rowwise, schedules.backward, schedules.partials_sum)."""

from __future__ import annotations

import dataclasses

from tvm import s_tir
from tvm.tirx import ForKind, IntImm

from schedules.knobs import annotate_unroll
from schedules.targets import TargetInfo
from te_ops.layer_norm import Kernel

UNROLL_STEPS = (0, 16, 64, 512)
CPU_VECTOR_BYTES = 32


def vector_width(kernel: Kernel, target: TargetInfo) -> int:
    """Elements per vector access: 16 bytes on GPUs (32 on AVX2 CPUs), halved until it divides N."""
    itemsize = 4 if kernel.dtype == "float32" else 2
    width = (16 if target.is_gpu else CPU_VECTOR_BYTES) // itemsize
    while kernel.hidden % width:
        width //= 2
    return width


FLOAT_LANES = 4  # float32 elements in a 16-byte vector: TVM's CUDA codegen has no 8-wide float


def param_lanes(kernel: Kernel) -> int:
    """Vector lanes for gamma and beta where they are read as they are (not widened): 4 when they
    are float32 (rows vectorized 8 wide are 16-bit then: mixed precision), else no limit (0)."""
    return FLOAT_LANES if kernel.params == "float32" else 0


def thread_candidates(kernel: Kernel, target: TargetInfo, max_per_thread: int = 64) -> list[int]:
    """threadIdx.x extents that split a row evenly into vectors, whole warps where possible.

    `max_per_thread` bounds the elements each thread keeps in registers per cached tensor.
    """
    units = kernel.hidden // vector_width(kernel, target)
    divisors = [d for d in range(1, min(units, target.max_threads) + 1) if units % d == 0]
    warp_multiples = [d for d in divisors if d % target.warp == 0]
    fitting = [
        d for d in (warp_multiples or divisors[-1:]) if units // d * vector_width(kernel, target) <= max_per_thread
    ]
    return fitting or [max(warp_multiples or divisors)]


def block_kernel(kernel: Kernel, split: int) -> Kernel:
    """`kernel` as far as one thread block sees it: its rows' columns split over `split` blocks
    of a cluster (0: one block, the whole row)."""
    return dataclasses.replace(kernel, hidden=kernel.hidden // split) if split else kernel


def legalized_bf16(kernel: Kernel, target: TargetInfo) -> bool:
    """bfloat16 emulated in float32 (CPUs, ROCm): TVM 0.27's bf16 legalization leaves loads of a
    local bf16 buffer inside the pair reduction's Bind statements unrewritten, and the build fails
    ("Load/Store of buffer dy_local occurred before its declaration"). The backward re-reads its
    rows on ROCm (or unbinds the pair on CPUs); the forward caches its row widened to fp32."""
    return kernel.dtype == "bfloat16" and target.family != "cuda"


def is_const_int(expr, value: int) -> bool:
    return isinstance(expr, IntImm) and int(expr) == value


def read_index(sch: s_tir.Schedule, block, buffer_name: str) -> int:
    reads = sch.get(block).reads
    return next(i for i, region in enumerate(reads) if region.source.name == buffer_name)


def spread_row(
    sch: s_tir.Schedule,
    block,
    threads,
    vec: int,
    vectorize: bool,
    gpu: bool,
    units: int = 2,
    lanes: int = 0,
    chunked: int = 0,
) -> None:
    """Split a block's innermost (hidden-size) loop over threads and vector lanes.

    Interleaved, [serial, threads, vec]: a warp's vector accesses are contiguous. Chunked,
    [threads, serial, vec]: each thread owns one contiguous piece of the row, so a register cache
    compacts to exactly that piece (interleaved, TVM sizes it by the row's span, and large rows then
    end up in local memory).
    """
    loop = sch.get_loops(block)[-1]
    stmt = sch.get(loop)
    if stmt.kind != ForKind.SERIAL or (units == 1 and not is_const_int(stmt.extent, 1)):
        loop = sch.add_unit_loop(block)  # N == 1: the unit loop over the row was dropped
    if not gpu:
        outer, inner = sch.split(loop, [None, vec])
        if vectorize:
            sch.vectorize(inner)
        return
    if chunked:
        thread, outer, inner = sch.split(loop, [threads, None, vec])
    else:
        outer, thread, inner = sch.split(loop, [None, threads, vec])
    sch.bind(thread, "threadIdx.x")
    # Unrolled so that register-cached rows are indexed with constants and stay in registers.
    sch.unroll(outer)
    if vectorize and lanes and vec > lanes:
        # fp32 accumulators of a 16-bit row: CUDA has no 8-wide float vector type.
        outer, inner = sch.split(inner, [None, lanes])
        sch.unroll(outer)
    if vectorize:
        sch.vectorize(inner)
    else:
        sch.unroll(inner)


def row_write_back(sch: s_tir.Schedule, name: str, vec: int, gpu: bool):
    """A register copy of output `name` for full-width stores (see store_row); None if not needed.

    Made before the row loops are split, so the copy is indexed like the output itself and
    compacts to one row wherever it is computed.
    """
    return sch.cache_write(sch.get_sblock(name), 0, "local") if gpu and vec > 4 else None


def store_row(
    sch: s_tir.Schedule,
    name: str,
    row,
    threads,
    vec: int,
    gpu: bool,
    units: int = 2,
    chunked: int = 0,
    write_back=None,
) -> None:
    """Compute a [rows, N] output in fp32 4-lane chunks, then store it with full-width vectors.

    TVM's CUDA codegen has no 8-wide float vector, so a 16-bit row (8 elements per 16 bytes) is
    computed into a register copy 4 lanes at a time and written back 16 bytes at a time.
    """
    block = sch.get_sblock(name)
    if write_back is None:
        write_back = row_write_back(sch, name, vec, gpu)
    if write_back is not None:
        sch.reverse_compute_at(write_back, row)
        spread_row(sch, block, threads, vec, vectorize=True, gpu=gpu, units=units, lanes=4, chunked=chunked)
        spread_row(sch, write_back, threads, vec, vectorize=True, gpu=gpu, units=units, chunked=chunked)
    else:
        spread_row(sch, block, threads, vec, vectorize=True, gpu=gpu, units=units, chunked=chunked)


def unroll_by_knob(sch: s_tir.Schedule, loop, knobs, explicit: bool = True) -> None:
    annotate_unroll(sch, loop, knobs.pick(sch, "unroll", UNROLL_STEPS), explicit)
