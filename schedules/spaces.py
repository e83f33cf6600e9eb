"""Design spaces: one schedule function per shape of work, parametrized by the target's facts.

- `rowwise`: forward and forward statistics. A row (or a few rows, on threadIdx.y) per thread block,
  the row held in registers after one 16-byte-vectorized read, warp-shuffle/shared-memory allreduces.
- `one_pass_backward`: dx and the fp32 dgamma/dbeta partials in one kernel. Block p walks rows
  p*R .. p*R+R-1, reads x and dy once per row, writes dx and keeps its partials in registers.
- `partials_sum`: adds the P partials per column, coalesced across columns, in a fixed order.

Each function takes `knobs` (schedules.knobs): Sampled for a MetaSchedule design space, Fixed for a
baseline or a replayed tuned record. Python never branches on a knob's value, so a trace replays.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from tvm import s_tir
from tvm.tirx import AttrStmt, For, ForKind, IntImm, PrimFunc, SeqStmt

from schedules import cluster, cpu, tir_tree
from schedules.knobs import Recorder, annotate_unroll
from schedules.targets import TargetInfo
from te_ops.layer_norm import BACKWARD_STAGES, ROW_GRANULE, Kernel

ROWS_PER_BLOCK = (1, 2, 4, 8)
# Knob values are appended, never inserted, so tuned decisions and variant labels keep their meaning.
# A column slice of 8 floats is one 32-byte sector: narrow slices give short rows more blocks.
SUM_COLUMNS = (32, 64, 128, 256, 8, 16)
SUM_LANES = (1, 2, 4, 8, 16, 32, 64, 128)  # columns x lanes > max_threads is rejected by VerifyGPUCode
_FIRST_SUM_GRID = (4, 6)  # how many of each the first sessions' variant labels were numbered over
UNROLL_STEPS = (0, 16, 64, 512)
ROWS_PER_STEP = (1, ROW_GRANULE)  # backward rows whose x and dy are loaded together (a structural knob)
GAMMA_SHARED = 2  # cache_gamma: gamma widened to fp32 in shared memory (staged rows 2)
STAGE_ROWS = (0, 1, 2)  # backward stages kept in registers (see one_pass_backward)
PREFETCH = (0, 1, 2)  # steps ahead that a CUDA backward copies rows into shared memory (0: none)
ROWS_PER_STEP_KEY = "lntune.rows_per_step"  # marks the split in a trace (schedules.database._structure)
# Resident threads per SM that a CUDA backward asks ptxas to fit (0: no request), and the loop
# annotation that carries the resulting minimum blocks per SM to with_launch_bounds.
THREADS_PER_SM = (0, 1024, 1536, 2048)
MIN_BLOCKS_KEY = "lntune.min_blocks_per_sm"
REGISTERS_PER_SM = 65536  # every CUDA GPU since sm_50
CPU_VECTOR_BYTES = 32
CLUSTER = (0, cluster.SIZE)  # blocks a backward row is split over (0: one block, no cluster)
CLUSTER_MIN_HIDDEN = 8192  # where a row's half still gives each block a long row
ROW_MOMENTS = ("x_sum", "x_dev")  # the forward's row reductions, in program order
ROW_STAGES = ("x_sum", "x_shift", "x_dev", "x_terms")  # ... with its per-row stages


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


def clusterable(kernel: Kernel, target: TargetInfo) -> bool:
    """A backward whose rows may split over a 2-block cluster: sm_90+, long rows, even vectors."""
    halves = kernel.hidden % (cluster.SIZE * vector_width(kernel, target)) == 0
    return target.has_clusters and kernel.hidden >= CLUSTER_MIN_HIDDEN and halves


def steps_for(kernel: Kernel) -> tuple[int, ...]:
    """The backward's rows_per_step candidates: steps that its chunks' granule rows divide into."""
    return tuple(step for step in ROWS_PER_STEP if kernel.granule % step == 0)


def rows_per_block_candidates(target: TargetInfo) -> tuple[int, ...]:
    """Rows per thread block in the row-wise kernels (threadIdx.y).

    ROCm: one. With several rows, TVM's allreduce passes an int64 lane index to
    llvm.amdgcn.ds.bpermute when the row count is int64, and LLVM rejects the module.
    """
    return (1,) if target.family == "rocm" else ROWS_PER_BLOCK


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


def is_const_int(expr, value: int) -> bool:
    return isinstance(expr, IntImm) and int(expr) == value


def _read_index(sch: s_tir.Schedule, block, buffer_name: str) -> int:
    reads = sch.get(block).reads
    return next(i for i, region in enumerate(reads) if region.source.name == buffer_name)


def _spread_row(
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


def _row_write_back(sch: s_tir.Schedule, name: str, vec: int, gpu: bool):
    """A register copy of output `name` for full-width stores (see _store_row); None if not needed.

    Made before the row loops are split, so the copy is indexed like the output itself and
    compacts to one row wherever it is computed.
    """
    return sch.cache_write(sch.get_sblock(name), 0, "local") if gpu and vec > 4 else None


def _store_row(
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
        write_back = _row_write_back(sch, name, vec, gpu)
    if write_back is not None:
        sch.reverse_compute_at(write_back, row)
        _spread_row(sch, block, threads, vec, vectorize=True, gpu=gpu, units=units, lanes=4, chunked=chunked)
        _spread_row(sch, write_back, threads, vec, vectorize=True, gpu=gpu, units=units, chunked=chunked)
    else:
        _spread_row(sch, block, threads, vec, vectorize=True, gpu=gpu, units=units, chunked=chunked)


def _unroll(sch: s_tir.Schedule, loop, knobs, explicit: bool = True) -> None:
    annotate_unroll(sch, loop, knobs.pick(sch, "unroll", UNROLL_STEPS), explicit)


def rowwise(sch: s_tir.Schedule, kernel: Kernel, target: TargetInfo, knobs) -> None:
    """forward / forward_stats: rows on blocks (and threadIdx.y), each row read once into registers."""
    gpu = target.is_gpu
    vec = vector_width(kernel, target)
    outputs = (["y"] if kernel.op == "forward" else []) + ["mean", "rstd"]
    if not _legalized_bf16(kernel, target):
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
    if _legalized_bf16(kernel, target):
        # The row cached widened to fp32 (stage x_f32): bf16 legalization leaves loads of a local
        # bf16 buffer inside the pair reduction unrewritten (see _legalized_bf16).
        x_cache = sch.get_sblock("x_f32")
        sch.compute_at(x_cache, row)
        sch.set_scope(x_cache, 0, "local")
    else:
        # Every reader of x (and below, of dy and gamma) shares the cache, so no consumer_blocks:
        # trace simplification drops the get_sblock instructions that only feed such a list.
        x_sum = sch.get_sblock("x_sum")
        x_cache = sch.cache_read(x_sum, _read_index(sch, x_sum, "x"), "local")
        sch.compute_at(x_cache, row)
    _spread_row(sch, x_cache, threads, vec, vectorize=True, gpu=gpu)
    for name in ROW_MOMENTS:
        _spread_row(sch, sch.get_sblock(name), threads, vec, vectorize=False, gpu=gpu)
    if kernel.op == "forward":
        _store_row(sch, "y", row, threads, vec, gpu, units=kernel.hidden)
    _unroll(sch, row_block, knobs)  # on CPUs too: the loop bodies over N unroll (or not)


def one_pass_backward(sch: s_tir.Schedule, kernel: Kernel, target: TargetInfo, knobs) -> None:
    """dx + partial dgamma/dbeta in one kernel: chunk p of rows per thread block, x and dy read once.

    Structures: `cache_rows` keeps each row of x and dy in registers between the row reductions and
    dx (one DRAM read); without it the second use re-reads them (from L1/L2), which frees registers
    for the partial accumulators at large N. `cache_gamma` keeps this thread's slice of gamma in
    registers for the whole chunk; 2 (CUDA, with stage_rows 2) widens it to fp32 once a block into
    shared memory instead: the 16-bit cluster halves at N = 16384 have no registers to spare for it
    (re-read, it cost 10 global loads and 16 conversions a row; docs/performance.md, section 5).
    `rows_per_step` rows are loaded before the first is reduced, and
    `explicit_unroll` says whether TVM or nvcc unrolls. `shared_acc` (CUDA) keeps the dgamma/dbeta
    accumulators in dynamic shared memory instead of registers: at N = 16384 they are 128 KB a
    block, half the register file, which otherwise leaves room for one row in flight.
    `stage_rows` (with cached rows; not ROCm) computes per-element values once into registers
    instead of in each block that uses them (each block sits under its own row predicate, so nvcc
    cannot share them between blocks): 1 keeps the row's xhat, float dy and dy·gamma; 2 keeps xhat
    and float dy, with gamma widened to fp32 once per chunk (with cache_gamma) and dy·gamma
    recomputed, for fewer registers.
    `threads_per_sm` (CUDA) asks ptxas, through __launch_bounds__, to keep the registers per thread
    low enough for that many resident threads: left alone it gave most 16-bit kernels 128
    registers, 512 threads an SM (1024 won most 16-bit kernels; docs/performance.md, section 4).
    `prefetch` (CUDA, with cached rows) copies the x and dy rows of the step `prefetch` steps ahead
    into shared memory with cp.async while this step reduces and writes: without it a block's
    loads wait for its own row barriers, and 16-bit rows (half the bytes a barrier) kept DRAM at
    ~63 % busy (Nsight Compute; docs/performance.md, section 6).
    `private_copies` (with prefetch) builds the kernel without the pipeline's own two block barriers
    a step (schedules.private_copies; each thread reads back only the rows it copied). On the H100
    it was faster at 16-bit N = 8192 and slower at N = 4096 (docs/performance.md, section 6), so it
    is measured, not ruled.
    `row_scalars` (not ROCm yet) keeps the row's c1/N and c2/N (stage "crow") in two registers per
    thread. Inlined, every element re-reads the allreduce's result, which TVM declares volatile
    shared memory, so nvcc can neither keep it in a register nor share the scaling: two shared
    loads and two multiplies an element (54 of 884 PTX instructions, bfloat16 N = 4096).
    `cluster` (2; CUDA sm_90+) splits every row's columns over the two blocks of a thread-block
    cluster (schedules.cluster): each block caches, reduces, writes dx and accumulates partials for
    its half, and the row sums meet through distributed shared memory: at N = 16384 one block a
    row has registers for one row in flight only (docs/performance.md, section 7).
    """
    gpu = target.is_gpu
    vec = vector_width(kernel, target)
    local = "local" if gpu else cpu.SCOPE  # per-row buffers on a CPU's stack (schedules.cpu)
    cacheable = (0,) if _legalized_bf16(kernel, target) and gpu else (1, 0)
    cache_rows = knobs.structural(sch, "cache_rows", cacheable)
    cache_gamma = knobs.structural(
        sch, "cache_gamma", cacheable + ((GAMMA_SHARED,) if 1 in cacheable and target.family == "cuda" else ())
    )
    chunked = knobs.structural(sch, "chunked", (0, 1))
    rows_per_step = knobs.structural(sch, "rows_per_step", steps_for(kernel))
    explicit_unroll = knobs.structural(sch, "explicit_unroll", (1, 0))
    shared_acc = knobs.structural(sch, "shared_acc", (0, 1) if target.family == "cuda" else (0,))
    threads_per_sm = knobs.structural(sch, "threads_per_sm", THREADS_PER_SM if target.family == "cuda" else (0,))
    # Never sampled by tuning (structures() leaves it 0): records from before it replay unchanged.
    split = knobs.structural(sch, "cluster", CLUSTER if clusterable(kernel, target) else (0,))
    per_block = _block_kernel(kernel, split)
    threads = 1
    if gpu:
        cands = thread_candidates(per_block, target, max_per_thread=32 if cache_rows else 64)
        threads = knobs.pick(sch, "threads", cands)
    # Not on ROCm yet: its ISA with staged rows is unchecked. CPUs have it so tests can check it.
    staged = knobs.structural(sch, "stage_rows", STAGE_ROWS if target.family != "rocm" and cache_rows else (0,))
    if cache_gamma == GAMMA_SHARED and staged != 2:
        raise ValueError("cache_gamma 2 (gamma in shared memory) needs stage_rows 2 (gamma widened once a block)")
    # Not with shared accumulators: their updates under the row predicate then need barriers TVM
    # cannot place ("Cannot insert syncs inside condition").
    prefetchable = target.family == "cuda" and cache_rows and not shared_acc
    prefetch = knobs.structural(sch, "prefetch", PREFETCH if prefetchable else (0,))
    # Not a schedule primitive: database.scheduled marks the function, and lntune's TIR pipeline
    # then drops the prefetch pipeline's own block barriers (schedules.private_copies).
    knobs.structural(sch, "private_copies", (0, 1) if prefetch else (0,))
    kept = {0: (), 1: ("xhat", "dyg", "dyf"), 2: ("xhat", "dyf") + (("gammaf",) if cache_gamma else ())}[staged]
    row_scalars = knobs.structural(sch, "row_scalars", (0, 1) if target.family != "rocm" else (0,))
    kept += ("crow",) if row_scalars else ()
    inline_stages(sch, keep=kept)
    # CPUs: c1 and c2 over vector accumulators (schedules.cpu), rfactored while "c" is alone.
    row_lanes = None if gpu else cpu.rfactor_lanes(sch, "c", kernel, knobs)
    dx_write_back = _row_write_back(sch, "dx", vec, gpu)
    # The row sums' per-block half (the cluster's rank is its first spatial loop after rfactor).
    reduce = cluster.split_reduction(sch, "c") if split else sch.get_sblock("c")
    # Rows split as [chunk, step, granule], the granule matching te_ops' chunk rounding exactly;
    # with a cluster, [chunk, rank, step, granule], the rank a half of the columns.
    row_nests = []
    for block in (reduce, sch.get_sblock("dx")):
        loops = sch.get_loops(block)
        rows = sch.split(loops[0], [kernel.parts, None, kernel.granule])
        if split:
            rank = loops[1] if block == reduce else sch.split(loops[1], [split, None])[0]
            rows = (rows[0], rank, *rows[1:])
            sch.reorder(*rows)
        row_nests.append(rows)
    accumulators, write_backs = [], []
    for name in ("dgamma_part", "dbeta_part"):
        # The original block now accumulates in registers; the returned one writes them back.
        write_backs.append(sch.cache_write(sch.get_sblock(name), 0, "shared.dyn" if shared_acc else local))
        acc = sch.get_sblock(name)
        p, j, r = sch.get_loops(acc)
        ranks = ()
        if split:
            rank, j = sch.split(j, [split, None])
            ranks = (rank,)
        sch.reorder(p, *ranks, r, j)
        row_nests.append((p, *ranks, *sch.split(r, [None, kernel.granule])))
        accumulators.append(acc)
    # compute_at cannot line these up (the partials do not consume dx), so merge the nests' loops.
    merged = [sch.merge(*[n[level] for n in row_nests]) for level in range(len(row_nests[0]))]
    chunk, step, row = merged[0], merged[-2], merged[-1]
    outer = merged[1] if split else chunk  # what a block covers: its chunk of rows (and its half)
    if rows_per_step == 1 and prefetch:
        # A loop of one row inside the step: the pipelined step's body then lists the copies and
        # this loop, which cross-thread reduction lowering leaves one statement.
        step, row = sch.split(sch.fuse(step, row), [None, 1])
    elif rows_per_step == 1:
        step = row = sch.fuse(step, row)
    else:
        # The row caches below sit at the step: all its rows are loaded before the first reduction.
        sch.annotate(step, ROWS_PER_STEP_KEY, rows_per_step)
        # Unrolled so the caches' row slots are constants (registers), but by nvcc: TVM's explicit
        # unrolling copies the cross-thread allreduce and leaves its result variable undefined.
        sch.unroll(row)
        sch.annotate(row, "pragma_unroll_explicit", 0)
    for write_back in write_backs:
        sch.reverse_compute_at(write_back, outer)
    for index in (0, 1):  # c1, c2
        sch.set_scope(sch.get_sblock("c"), index, local)
        if split:
            sch.set_scope(reduce, index, local)
    if row_scalars:
        crow = sch.get_sblock("crow")
        sch.compute_at(crow, row)
        sch.set_scope(crow, 0, local)
        sch.unroll(sch.get_loops(crow)[-1])
    if split:  # after its consumers: the block that adds the halves, the cluster exchange later
        sch.compute_at(sch.get_sblock("c"), row)
    if row_lanes is not None:
        cpu.vectorize_lanes(sch, row_lanes, row)
    dx = sch.get_sblock("dx")
    readers = {"x": sch.get_sblock("xhat"), "dy": sch.get_sblock("dyf")} if staged else {"x": dx, "dy": dx}
    for name in (n for n in ("xhat", "dyg", "dyf", "gammaf") if n in kept):  # consumers before producers
        sch.compute_at(sch.get_sblock(name), outer if name == "gammaf" else row)
        shared = name == "gammaf" and cache_gamma == GAMMA_SHARED
        sch.set_scope(sch.get_sblock(name), 0, "shared.dyn" if shared else local)
    caches = []
    # Every reader of x, dy and gamma shares its cache, so no consumer_blocks: trace simplification
    # drops the get_sblock instructions that only feed such a list.
    for buffer in ("x", "dy") if cache_rows else ():
        cache = sch.cache_read(readers[buffer], _read_index(sch, readers[buffer], buffer), local)
        sch.compute_at(cache, step)
        if rows_per_step > 1:
            # Steps start at an even row (chunks are `granule` multiples), so row % step names the
            # slot; left to buffer compaction, symbolic M's bounds check keeps the cache M rows long.
            sch.transform_layout(
                cache, ("write", 0), lambda i, j: (i % rows_per_step, j), assume_injective_transform=True
            )
            sch.unroll(sch.get_loops(cache)[-2])  # the step's rows; the row's own loop is split below
        caches.append(cache)
    copies = [sch.cache_read(cache, 0, "shared.dyn") for cache in caches] if prefetch else []
    for copy in copies:
        sch.compute_at(copy, step)
        if rows_per_step > 1:
            sch.unroll(sch.get_loops(copy)[-2])
    gamma_cache = None
    if cache_gamma and "gammaf" not in kept:
        reader = sch.get_sblock("dyg") if "dyg" in kept else dx
        gamma_cache = sch.cache_read(reader, _read_index(sch, reader, "gamma"), local)
        sch.compute_at(gamma_cache, outer)
        caches.append(gamma_cache)
    if split:
        sch.bind(chunk, cluster.CHUNK_AXIS)
        sch.bind(outer, cluster.RANK_AXIS)
    elif gpu:
        sch.bind(chunk, "blockIdx.x")
    else:
        sch.parallel(chunk)
    if threads_per_sm:
        if not isinstance(threads, int):
            raise ValueError("threads_per_sm needs a fixed thread count (it is not a tuning structure)")
        sch.annotate(chunk, MIN_BLOCKS_KEY, max(1, threads_per_sm // threads))
    spread = dict(gpu=gpu, units=kernel.hidden, chunked=chunked)
    for block in caches + copies:
        # float32 gamma beside 16-bit rows (mixed precision) takes 4 lanes at a time: no float8.
        lanes = param_lanes(kernel) if block is gamma_cache else 0
        _spread_row(sch, block, threads, vec, vectorize=True, lanes=lanes, **spread)
    for name in (n for n in kept if n != "crow"):
        _spread_row(sch, sch.get_sblock(name), threads, vec, vectorize=True, lanes=4, **spread)
    _store_row(sch, "dx", row, threads, vec, write_back=dx_write_back, **spread)
    for block in accumulators:
        _spread_row(sch, block, threads, vec, vectorize=True, lanes=4, **spread)
    _spread_row(sch, reduce, threads, vec, vectorize=False, **spread)
    for write_back in write_backs:
        _spread_row(sch, write_back, threads, vec, vectorize=True, lanes=4, **spread)
    if not gpu and not staged:
        cpu.one_pass_over_row(sch, [dx, *accumulators], kernel)
    # Decompose last: binding a loop of a decomposed reduction fails ("compact dataflow").
    for acc in accumulators:
        sch.decompose_reduction(acc, sch.get_loops(acc)[len(merged) - 2])  # at the step loop
    if row_lanes is not None:
        cpu.decompose_lanes(sch, row_lanes)
    if gpu:
        _unroll(sch, chunk, knobs, explicit=bool(explicit_unroll))
    if needs_unbound_pair(kernel, target):
        unbind_pair_reduction(sch)
    if copies:
        software_pipeline(sch, step, {sch.get(copy).name_hint for copy in copies}, prefetch)


def _first_block_name(stmt) -> str:
    while not hasattr(stmt, "block"):
        stmt = stmt.seq[0] if isinstance(stmt, SeqStmt) else stmt.body
    return stmt.block.name_hint


def software_pipeline(sch: s_tir.Schedule, loop, producers: set[str], depth: int) -> None:
    """Run the `producers` blocks in `loop`'s body `depth` iterations ahead of the rest, as
    asynchronous copies (cp.async, which the build's PASS_CONFIG turns on) that the rest waits for.
    TVM's InjectSoftwarePipeline keeps depth + 1 copies of their buffers."""
    body = sch.get(loop).body
    statements = list(body.seq) if isinstance(body, SeqStmt) else [body]
    stages = [0 if _first_block_name(stmt) in producers else depth for stmt in statements]
    issue_order = sorted(range(len(stages)), key=lambda i: stages[i])  # stable: copies first, as they were
    sch.annotate(loop, "software_pipeline_stage", stages)
    sch.annotate(loop, "software_pipeline_order", [issue_order.index(i) for i in range(len(stages))])
    sch.annotate(loop, "software_pipeline_async_stages", [0])


def with_launch_bounds(func: PrimFunc) -> PrimFunc:
    """Turn a MIN_BLOCKS_KEY loop annotation into the attribute TVM's CUDA codegen emits as
    `__launch_bounds__(threads, min_blocks)`. Schedules cannot place that attribute themselves."""

    def marked(stmt) -> bool:
        return isinstance(stmt, For) and MIN_BLOCKS_KEY in stmt.annotations

    def bounded(stmt):
        if not marked(stmt):
            return None
        blocks = IntImm("int32", int(stmt.annotations[MIN_BLOCKS_KEY]))
        body = AttrStmt(IntImm("int32", 0), "tirx.launch_bounds_min_blocks_per_sm", blocks, stmt.body)
        rest = {k: v for k, v in stmt.annotations.items() if k != MIN_BLOCKS_KEY}
        return tir_tree.loop_with(stmt, body, rest)

    return func.with_body(tir_tree.rewrite(func.body, bounded)) if tir_tree.find(func.body, marked) else func


def inline_stages(sch: s_tir.Schedule, keep: Sequence[str] = ()) -> None:
    """Inline the backward's stages (te_ops.layer_norm.BACKWARD_STAGES) that the function still has,
    but those in `keep`: with none kept, the kernel as it was before they existed."""
    for name in BACKWARD_STAGES:
        if name in keep:
            continue
        try:
            block = sch.get_sblock(name)
        except s_tir.ScheduleError:  # already inlined (a tuning workload)
            continue
        sch.compute_inline(block)


def _legalized_bf16(kernel: Kernel, target: TargetInfo) -> bool:
    """bfloat16 emulated in float32 (CPUs, ROCm): TVM 0.27's bf16 legalization leaves loads of a
    local bf16 buffer inside the pair reduction's Bind statements unrewritten, and the build fails
    ("Load/Store of buffer dy_local occurred before its declaration"). The backward re-reads its
    rows on ROCm (or unbinds the pair on CPUs); the forward caches its row widened to fp32."""
    return kernel.dtype == "bfloat16" and target.family != "cuda"


def needs_unbound_pair(kernel: Kernel, target: TargetInfo) -> bool:
    """A CPU bfloat16 backward: its pair reduction must take the Bind-free form to build."""
    return kernel.op == "backward" and not target.is_gpu and _legalized_bf16(kernel, target)


def unbind_pair_reduction(sch: s_tir.Schedule) -> None:
    """Rewrite block "c" from `v0 = c1 + a; v1 = c2 + b; c1 = v0; c2 = v1` to `c1 = c1 + a; c2 = c2 + b`.

    The Bind form is what GPU cross-thread reduction needs, and what breaks bf16 legalization
    (_legalized_bf16); a CPU reduces within a thread, so there it takes the Bind-free form (the two
    updates read disjoint buffers, so the order does not matter). Not a traced primitive: tuning
    applies it again as a postprocessor (schedules.tune).
    """
    for name in ("c", "c_rf", "c_rf_update"):  # c_rf: the CPU's vector lanes of the pair (schedules.cpu)
        try:
            _unbind_pair(sch, sch.get_sblock(name))
        except s_tir.ScheduleError:  # no such block
            continue


def _unbind_pair(sch: s_tir.Schedule, rv) -> None:
    from tvm import tirx

    block = sch.get(rv)
    if not any(isinstance(stmt, tirx.stmt.Bind) for stmt in block.body.seq):
        return
    bound = {stmt.var: stmt.value for stmt in block.body.seq if isinstance(stmt, tirx.stmt.Bind)}
    stores = [
        tirx.BufferStore(stmt.buffer, bound[stmt.value], stmt.indices)
        for stmt in block.body.seq
        if isinstance(stmt, tirx.BufferStore)
    ]
    fields = ("iter_vars", "reads", "writes", "name_hint")
    rest = ("init", "alloc_buffers", "match_buffers", "annotations")
    new = s_tir.SBlock(*(getattr(block, f) for f in fields), tirx.SeqStmt(stores), *(getattr(block, f) for f in rest))
    sch.state.replace(sch.get_sref(rv), new, {block: new})


def partials_sum(sch: s_tir.Schedule, kernel: Kernel, target: TargetInfo, knobs) -> None:
    """dgamma/dbeta from [P, N] partials: columns across threadIdx.x (coalesced), P split over
    threadIdx.y lanes, each summing its share serially before one tree reduction across the lanes.

    With the P rows on one thread, a short row (N = 1024 gives 1024 threads in all) leaves the GPU
    idle while each thread walks P dependent loads; the lanes multiply the loads in flight. The
    order of additions is fixed by the schedule, so the result is deterministic.
    """
    gpu = target.is_gpu
    width = knobs.pick(sch, "threads", SUM_COLUMNS) if gpu else vector_width(kernel, target)
    splits = [sch.split(sch.get_loops(sch.get_sblock(b))[0], [None, width]) for b in ("dgamma", "dbeta")]
    outer = sch.merge(*[s[0] for s in splits])
    inner = sch.merge(*[s[1] for s in splits])
    if gpu:
        sch.bind(outer, "blockIdx.x")
        sch.bind(inner, "threadIdx.x")
    else:
        sch.parallel(outer)
    lanes = knobs.pick(sch, "lanes", SUM_LANES) if gpu else 1
    for name in ("dgamma_acc", "dbeta_acc"):
        block = sch.get_sblock(name)
        sch.compute_at(block, inner)
        sch.set_scope(block, 0, "local")
        if gpu:
            lane, _ = sch.split(sch.get_loops(block)[-1], [lanes, None])
            sch.bind(lane, "threadIdx.y")
    if gpu:
        _unroll(sch, outer, knobs)


SPACES = {"forward": rowwise, "forward_stats": rowwise, "backward": one_pass_backward, "backward_sum": partials_sum}


# CPUs: schedules.cpu, but for the backward, which shares one_pass_backward (its row sums in cpu).
CPU_SPACES = {**SPACES, "forward": cpu.rowwise, "forward_stats": cpu.rowwise, "backward_sum": cpu.partials_sum}


def apply(sch: s_tir.Schedule, kernel: Kernel, target: TargetInfo, knobs) -> None:
    """Schedule `kernel` in place with the design space of its op."""
    (SPACES if target.is_gpu else CPU_SPACES)[kernel.op](sch, kernel, target, knobs)


def structures(kernel: Kernel, target: TargetInfo) -> list[dict[str, int]]:
    """The structural variants of a kernel's design space (one MetaSchedule design space each)."""
    if kernel.op == "backward" and target.is_gpu:
        cacheable = (0,) if _legalized_bf16(kernel, target) else (1, 0)
        return [{"cache_rows": r, "cache_gamma": g, "chunked": c} for r in cacheable for g in cacheable for c in (0, 1)]
    if kernel.op == "backward":
        return cpu.structures(kernel)
    return [{}]


def default_knobs(kernel: Kernel, target: TargetInfo) -> dict[str, int]:
    """The baseline: knob values chosen by rule (a few vectors per thread, registers within budget)."""
    if not target.is_gpu:
        return cpu.default_knobs(kernel)
    if kernel.op == "backward_sum":
        # Measured on the H100 over every split (lntune select, 2026-11-26): 32 columns a block with
        # P split over 8 lanes (N <= 4096) or 4 (longer rows, more blocks already) took half the time
        # of the previous rule (32 x 32 lanes, or 256 columns x 1 lane past 4096; docs/performance.md,
        # section 3).
        return {"threads": 32, "lanes": 8 if kernel.hidden <= 4096 else 4, "unroll": 64}
    if kernel.op in ("forward", "forward_stats"):
        cands = thread_candidates(kernel, target)
        vec = vector_width(kernel, target)
        threads = min(cands, key=lambda t: (abs(kernel.hidden / t / vec - 2), t))
        rows = max(1, min(rows_per_block_candidates(target)[-1], 128 // threads))
        return {"threads": threads, "rows_per_block": rows, "unroll": 64}
    # Rows past 16 KB: gamma stays in L1 instead of registers, and each thread owns a contiguous
    # piece of the row (see _spread_row) so that the register caches stay registers.
    long_row = kernel.hidden * (4 if kernel.dtype == "float32" else 2) > 16384
    cands = thread_candidates(kernel, target, max_per_thread=32)
    threads = min(cands, key=lambda t: (abs(kernel.hidden / t - 16), -t))
    return {
        "cache_rows": 1,
        "cache_gamma": int(not long_row),
        "chunked": int(long_row),
        "rows_per_step": 1,
        "explicit_unroll": 1,
        "shared_acc": 0,
        "threads_per_sm": 0,
        "stage_rows": 0,
        "row_scalars": 0,
        "prefetch": 0,
        "private_copies": 0,
        "cluster": 0,
        "threads": threads,
        "unroll": 64,
    }


def _backward_variants(kernel: Kernel, target: TargetInfo, base: dict) -> list[dict[str, int]]:
    """Structural variants of a CUDA backward around `base`.

    The three thread counts nearest the rule's x row layout (interleaved or chunked) x rows per step
    and who unrolls (TVM or nvcc; two rows a step only with nvcc, see one_pass_backward); from 8192
    columns also rows re-read instead of cached, and dgamma/dbeta accumulated in shared memory.
    Then occupancy requests, staged rows and prefetching over those, and per-row scalars.
    Measured on the H100, neighbours here differed by up to 3x, for register and local-memory
    reasons that a rule does not predict (docs/performance.md, section 4).
    """
    rule = default_knobs(kernel, target)
    found = [{**base, "explicit_unroll": 0}]
    long_row = kernel.hidden >= 8192
    for cache_rows, shared_acc in itertools.product((1, 0) if long_row else (1,), (0, 1) if long_row else (0,)):
        cands = thread_candidates(kernel, target, max_per_thread=32 if cache_rows else 64)
        for threads in sorted(cands, key=lambda t: abs(t - rule["threads"]))[:3]:
            for chunked in (0, 1):
                for step, explicit in ((1, 1), (1, 0), (ROW_GRANULE, 0)):  # explicit needs one row a step
                    layout = dict(cache_rows=cache_rows, chunked=chunked, rows_per_step=step, threads=threads)
                    found.append({**rule, **layout, "explicit_unroll": explicit, "shared_acc": shared_acc})
    # Appended, so that the labels of the variants above (variant<i> in selection.json) stay put.
    plain = list(found)
    found += _occupied(kernel, plain)
    # Staged rows and prefetching with nvcc unrolling only: TVM's explicit unrolling lost nearly
    # everywhere it was timed. Prefetching never beside shared accumulators (see one_pass_backward).
    cached = [k for k in plain if k["cache_rows"] and not k["explicit_unroll"]]
    for stage in STAGE_ROWS[1:]:
        staged = [{**k, "stage_rows": stage} for k in cached]
        found += staged + _occupied(kernel, staged)
    for depth in PREFETCH[1:]:
        ahead = _prefetchable(kernel, target, [{**k, "prefetch": depth} for k in cached])
        found += ahead + _occupied(kernel, ahead)
    # Per-row scalars on every unstaged variant so far: added to the choices of the day they won
    # 7 of 21 kernels by 2-3 % and tied 8; they lost 1-4 % at four, and beside staged rows
    # (docs/performance.md, section 5).
    found += [{**k, "row_scalars": 1} for k in found if not k["stage_rows"]]
    # Staged rows prefetched, with and without per-row scalars: staging converts each 16-bit
    # element once instead of in every block that uses it (848 -> 725 PTX instructions for
    # bfloat16 N = 8192 at 64 registers), and prefetched rows wait in shared memory, not registers.
    for depth in PREFETCH[1:]:
        both = [
            {**k, "stage_rows": stage, "prefetch": depth, "row_scalars": scalars}
            for k in cached
            for stage in STAGE_ROWS[1:]
            for scalars in (0, 1)
        ]
        both = _prefetchable(kernel, target, both)
        found += both + _occupied(kernel, both)
    found += _cluster_variants(kernel, target, rule)
    # Every prefetching variant again without its pipeline's own block barriers (appended last, so
    # the labels above stay put).
    found += [{**k, "private_copies": 1} for k in found if k.get("prefetch")]
    # Staged cluster halves with gamma re-read instead of kept in registers: at 64 registers the
    # kept fp32 gamma made ptxas spill in every row (Nsight Compute: 2 local loads and stores a row
    # a warp, long-scoreboard stalls x2.4, bfloat16 N = 16384; docs/performance.md, section 5).
    found += [{**k, "cache_gamma": 0} for k in found if k.get("cluster") and k.get("stage_rows")]
    # And with gamma widened once a block into shared memory: at 16-bit N = 16384 the halves ran
    # faster so, at N = 8192 (no cluster, registers to spare) slower (docs/performance.md, section 5).
    shared_gamma = [{**k, "cache_gamma": GAMMA_SHARED} for k in found if k.get("cluster") and k.get("stage_rows") == 2]
    found += _prefetchable(kernel, target, shared_gamma)
    unique = [base]
    for knobs in found:  # chunks of single rows (Kernel.granule 1) take one row a step only
        if knobs not in unique and knobs["rows_per_step"] in steps_for(kernel):
            unique.append(knobs)
    return unique[1:]


def _cluster_variants(kernel: Kernel, target: TargetInfo, rule: dict) -> list[dict[str, int]]:
    """Rows split over a 2-block cluster (one_pass_backward's `cluster`): the layouts above over
    half the columns, with row scalars (where it is made, the two halves' sums meet in registers),
    rows cached or re-read, accumulators in registers or shared memory, and prefetched 1 or 2 steps
    ahead. At N = 16384 on the H100 1024-thread halves won in 16-bit and 512-thread ones in float32;
    neighbours differed by up to 2.4x (float32; docs/performance.md, section 7)."""
    if not clusterable(kernel, target):
        return []
    half = _block_kernel(kernel, cluster.SIZE)
    half_rule = default_knobs(half, target)
    layouts = []
    for cache_rows, shared_acc in ((1, 0), (1, 1), (0, 0), (0, 1)):
        cands = thread_candidates(half, target, max_per_thread=32 if cache_rows else 64)
        for threads in sorted(cands, key=lambda t: abs(t - half_rule["threads"]))[:3]:
            for chunked, step in itertools.product((0, 1), ROWS_PER_STEP):
                layout = dict(cache_rows=cache_rows, shared_acc=shared_acc, chunked=chunked, rows_per_step=step)
                layouts.append(
                    {
                        **rule,
                        **layout,
                        "cache_gamma": half_rule["cache_gamma"],
                        "threads": threads,
                        "explicit_unroll": 0,
                        "row_scalars": 1,
                        "cluster": cluster.SIZE,
                    }
                )
    cached = [k for k in layouts if k["cache_rows"]]
    ahead = _prefetchable(kernel, target, [{**k, "prefetch": depth} for k in cached for depth in PREFETCH[1:]])
    # Two blocks an SM asked of ptxas even where registers_needed says they spill (64 registers
    # for 512 threads). Timed on the H100 at 16-bit N = 16384 they were 1.3-4.4x slower than the
    # best cluster layouts; they stay in the grid only so later labels keep their numbers.
    paired = [
        {**k, "threads_per_sm": 2 * k["threads"]}
        for k in layouts + ahead
        if not k["shared_acc"] and 2 * k["threads"] in THREADS_PER_SM[1:]
    ]
    # Staged rows (stage_rows 2, the 16-bit N = 8192 winner's structure) over prefetched halves,
    # with and without row scalars; only chunked ones, which get the counted exchange.
    staged = [{**k, "stage_rows": 2, "row_scalars": r} for k in ahead if k["chunked"] for r in (0, 1)]
    return layouts + ahead + _occupied(kernel, layouts + ahead) + paired + staged + _occupied(kernel, staged)


def _block_kernel(kernel: Kernel, split: int) -> Kernel:
    """`kernel` as far as one thread block sees it: its rows' columns split over `split` blocks
    of a cluster (0: one block, the whole row)."""
    return dataclasses.replace(kernel, hidden=kernel.hidden // split) if split else kernel


def _block_hidden(kernel: Kernel, knobs: dict) -> int:
    """The columns of a row that one thread block handles (half of them in a cluster)."""
    return _block_kernel(kernel, knobs.get("cluster") or 0).hidden


def registers_needed(kernel: Kernel, knobs: dict) -> int:
    """A rough count of the 32-bit registers a backward thread keeps live: its cached rows, fp32
    accumulators, gamma slice, 16-bit dx staging and fp32 row stages, plus ~20 for addresses, row
    statistics and the allreduce. Checked against ptxas for every CUDA backward (sm_90,
    2026-11-26): where this fits a register budget, ptxas fitted it without spilling in all but a
    few cases."""
    per_thread = _block_hidden(kernel, knobs) // knobs["threads"]
    words = 1.0 if kernel.dtype == "float32" else 0.5
    param_words = 1.0 if kernel.params == "float32" else 0.5  # float32 gamma beside 16-bit rows: mixed
    stage = knobs.get("stage_rows", 0)
    # Staged, the row being reduced lives in its fp32 stages; its cached x and dy are dead by then.
    cached_rows = knobs["rows_per_step"] - (1 if stage else 0) if knobs["cache_rows"] else 0
    rows = cached_rows * 2 * per_thread * words
    accumulators = 0 if knobs["shared_acc"] else 2 * per_thread
    # gamma: this thread's slice, in its own dtype or (stage 2) widened to fp32; none when shared.
    gamma = (per_thread if stage == 2 else per_thread * param_words) if knobs["cache_gamma"] == 1 else 0
    staging = per_thread * words if words < 1 else 0
    stages = {0: 0, 1: 3 * per_thread, 2: 2 * per_thread}[stage]  # xhat, dy (and dy*gamma) in fp32
    return int(rows + accumulators + gamma + staging + stages) + 20


def shared_bytes_needed(kernel: Kernel, knobs: dict) -> int:
    """Dynamic shared memory of a CUDA backward block: prefetched rows of x and dy (depth + 1 steps
    in flight), shared dgamma/dbeta accumulators and gamma in fp32 (cache_gamma 2)."""
    columns = _block_hidden(kernel, knobs)
    row = columns * (4 if kernel.dtype == "float32" else 2)
    depth = knobs.get("prefetch", 0)
    rows = (depth + 1) * knobs["rows_per_step"] * 2 * row if depth else 0
    gamma = columns * 4 if knobs["cache_gamma"] == GAMMA_SHARED else 0
    return rows + (2 * columns * 4 if knobs["shared_acc"] else 0) + gamma


def _occupancies(kernel: Kernel, knobs: dict) -> list[int]:
    """threads_per_sm requests (beyond none) that a block of these knobs can meet without spilling,
    by registers_needed against the 64K registers of an SM. Only with nvcc unrolling (what won where
    occupancy was low) and register accumulators (shared ones are bound by shared memory instead)."""
    if knobs["explicit_unroll"] or knobs["shared_acc"]:
        return []
    need = registers_needed(kernel, knobs)
    return [t for t in THREADS_PER_SM[1:] if knobs["threads"] <= t and need * t <= REGISTERS_PER_SM]


def _prefetchable(kernel: Kernel, target: TargetInfo, group: list[dict]) -> list[dict[str, int]]:
    """Those of `group` a prefetching backward can build: no shared accumulators (see
    one_pass_backward) and the rows in flight within the block's dynamic shared memory."""
    return [k for k in group if not k["shared_acc"] and shared_bytes_needed(kernel, k) <= target.dynamic_shared_bytes]


def _occupied(kernel: Kernel, group: list[dict]) -> list[dict[str, int]]:
    """Each of `group` again with every threads_per_sm request that _occupancies allows it."""
    return [{**knobs, "threads_per_sm": t} for knobs in group for t in _occupancies(kernel, knobs)]


def _is_later_split(split: tuple[int, int]) -> bool:
    columns, lanes = split
    return SUM_COLUMNS.index(columns) >= _FIRST_SUM_GRID[0] or SUM_LANES.index(lanes) >= _FIRST_SUM_GRID[1]


def _sum_variants(kernel: Kernel, target: TargetInfo, base: dict) -> list[dict[str, int]]:
    """Every columns x lanes split of a partials sum that fits a block (the rule's is one of them).

    The sum moves 2·P·N·4 bytes, little beside the backward's rows, yet its time varied several-fold
    over the splits, and the best split depends on N and P (docs/performance.md, section 3). The
    first grid's splits come first, so their labels stay what committed selections say.
    """
    splits = sorted(((c, lanes) for c in SUM_COLUMNS for lanes in SUM_LANES), key=_is_later_split)
    return [
        {**base, "threads": columns, "lanes": lanes}
        for columns, lanes in splits
        if columns * lanes <= target.max_threads and (columns, lanes) != (base["threads"], base["lanes"])
    ]


def variants(kernel: Kernel, target: TargetInfo, base: dict) -> list[dict[str, int]]:
    """Knob sets besides `base` that `lntune select` times as exported (CUDA backward and its sum)."""
    if target.family != "cuda":
        return []
    if kernel.op == "backward":
        return _backward_variants(kernel, target, base)
    if kernel.op == "backward_sum":
        return _sum_variants(kernel, target, base)
    return []


def knob_names(kernel: Kernel, target: TargetInfo) -> Sequence[str]:
    """The knobs of a kernel's design space, in the order its schedule function picks them."""
    recorder = Recorder()
    sch = s_tir.Schedule(kernel.prim_func())
    apply(sch, kernel, target, recorder)
    return recorder.order


__all__ = [
    "apply",
    "default_knobs",
    "knob_names",
    "parts_candidates",
    "parts_for",
    "structures",
    "thread_candidates",
    "variants",
    "vector_width",
    "with_launch_bounds",
]
