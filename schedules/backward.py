"""The one-pass backward: dx and the fp32 dgamma/dbeta partials in one kernel. Block p walks rows
p*R .. p*R+R-1, reads x and dy once per row, writes dx and keeps its partials in registers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tvm import s_tir
from tvm.tirx import SeqStmt

from schedules import cluster, cpu
from schedules.layout import (
    block_kernel,
    legalized_bf16,
    param_lanes,
    read_index,
    row_write_back,
    spread_row,
    store_row,
    thread_candidates,
    unroll_by_knob,
    vector_width,
)
from schedules.rewrites import MIN_BLOCKS_KEY, needs_unbound_pair, unbind_pair_reduction
from schedules.targets import TargetInfo
from te_ops.layer_norm import BACKWARD_STAGES, ROW_GRANULE, Kernel

ROWS_PER_STEP = (1, ROW_GRANULE)  # backward rows whose x and dy are loaded together (a structural knob)
GAMMA_SHARED = 2  # cache_gamma: gamma widened to fp32 in shared memory (staged rows 2)
STAGE_ROWS = (0, 1, 2)  # backward stages kept in registers (see one_pass_backward)
PREFETCH = (0, 1, 2)  # steps ahead that a CUDA backward copies rows into shared memory (0: none)
ROWS_PER_STEP_KEY = "lntune.rows_per_step"  # marks the split in a trace (schedules.database._structure)
# Resident threads per SM that a CUDA backward asks ptxas to fit (0: no request); the minimum blocks
# per SM that follow travel to rewrites.with_launch_bounds as a rewrites.MIN_BLOCKS_KEY loop annotation.
THREADS_PER_SM = (0, 1024, 1536, 2048)
CLUSTER = (0, cluster.SIZE)  # blocks a backward row is split over (0: one block, no cluster)
CLUSTER_MIN_HIDDEN = 8192  # where a row's half still gives each block a long row


def clusterable(kernel: Kernel, target: TargetInfo) -> bool:
    """A backward whose rows may split over a 2-block cluster: sm_90+, long rows, even vectors."""
    halves = kernel.hidden % (cluster.SIZE * vector_width(kernel, target)) == 0
    return target.has_clusters and kernel.hidden >= CLUSTER_MIN_HIDDEN and halves


def steps_for(kernel: Kernel) -> tuple[int, ...]:
    """The backward's rows_per_step candidates: steps that its chunks' granule rows divide into."""
    return tuple(step for step in ROWS_PER_STEP if kernel.granule % step == 0)


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
    c = _pick_knobs(sch, kernel, target, knobs)
    inline_stages(sch, keep=c.kept)
    # CPUs: c1 and c2 over vector accumulators (schedules.cpu), rfactored while "c" is alone.
    row_lanes = None if c.gpu else cpu.rfactor_lanes(sch, "c", kernel, knobs)
    dx_write_back = row_write_back(sch, "dx", c.vec, c.gpu)
    # The row sums' per-block half (the cluster's rank is its first spatial loop after rfactor).
    reduce = cluster.split_reduction(sch, "c") if c.split else sch.get_sblock("c")
    merged, accumulators, write_backs = _split_rows(sch, kernel, c, reduce)
    chunk, outer, step, row = _shape_steps(sch, c, merged)
    _place_reductions(sch, c, reduce, write_backs, outer, row, row_lanes)
    dx, readers = _place_stages(sch, c, outer, row)
    caches, copies, gamma_cache = _cache_rows(sch, c, dx, readers, outer, step)
    _bind_chunks(sch, c, chunk, outer)
    spread = dict(gpu=c.gpu, units=kernel.hidden, chunked=c.chunked)
    for block in caches + copies:
        # float32 gamma beside 16-bit rows (mixed precision) takes 4 lanes at a time: no float8.
        lanes = param_lanes(kernel) if block is gamma_cache else 0
        spread_row(sch, block, c.threads, c.vec, vectorize=True, lanes=lanes, **spread)
    for name in (n for n in c.kept if n != "crow"):
        spread_row(sch, sch.get_sblock(name), c.threads, c.vec, vectorize=True, lanes=4, **spread)
    store_row(sch, "dx", row, c.threads, c.vec, write_back=dx_write_back, **spread)
    for block in accumulators:
        spread_row(sch, block, c.threads, c.vec, vectorize=True, lanes=4, **spread)
    spread_row(sch, reduce, c.threads, c.vec, vectorize=False, **spread)
    for write_back in write_backs:
        spread_row(sch, write_back, c.threads, c.vec, vectorize=True, lanes=4, **spread)
    if not c.gpu and not c.staged:
        cpu.one_pass_over_row(sch, [dx, *accumulators], kernel)
    # Decompose last: binding a loop of a decomposed reduction fails ("compact dataflow").
    for acc in accumulators:
        sch.decompose_reduction(acc, sch.get_loops(acc)[len(merged) - 2])  # at the step loop
    if row_lanes is not None:
        cpu.decompose_lanes(sch, row_lanes)
    if c.gpu:
        unroll_by_knob(sch, chunk, knobs, explicit=bool(c.explicit_unroll))
    if needs_unbound_pair(kernel, target):
        unbind_pair_reduction(sch)
    if copies:
        software_pipeline(sch, step, {sch.get(copy).name_hint for copy in copies}, c.prefetch)


@dataclasses.dataclass(frozen=True)
class _Choices:
    """What one_pass_backward's knobs chose, picked in the order its traces record them; `threads` is
    a sampled variable in a design space, else an int. `kept`: the stages kept in registers."""

    gpu: bool
    vec: int
    local: str
    cache_rows: int
    cache_gamma: int
    chunked: int
    rows_per_step: int
    explicit_unroll: int
    shared_acc: int
    threads_per_sm: int
    split: int
    threads: object
    staged: int
    prefetch: int
    row_scalars: int
    kept: tuple[str, ...]


def _pick_knobs(sch: s_tir.Schedule, kernel: Kernel, target: TargetInfo, knobs) -> _Choices:
    """Pick (or sample) the backward's knobs, each from the candidates this kernel and target allow."""
    gpu = target.is_gpu
    cacheable = (0,) if legalized_bf16(kernel, target) and gpu else (1, 0)
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
    per_block = block_kernel(kernel, split)
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
    return _Choices(
        gpu=gpu,
        vec=vector_width(kernel, target),
        local="local" if gpu else cpu.SCOPE,  # per-row buffers on a CPU's stack (schedules.cpu)
        cache_rows=cache_rows,
        cache_gamma=cache_gamma,
        chunked=chunked,
        rows_per_step=rows_per_step,
        explicit_unroll=explicit_unroll,
        shared_acc=shared_acc,
        threads_per_sm=threads_per_sm,
        split=split,
        threads=threads,
        staged=staged,
        prefetch=prefetch,
        row_scalars=row_scalars,
        kept=kept,
    )


def _split_rows(sch: s_tir.Schedule, kernel: Kernel, c: _Choices, reduce) -> tuple[list, list, list]:
    """Split the rows of the row sums, dx and the two partials into chunks, steps and granules, and
    merge the four nests level by level. Returns the merged loops, the partials' register
    accumulators and the blocks that write them back."""
    # Rows split as [chunk, step, granule], the granule matching te_ops' chunk rounding exactly;
    # with a cluster, [chunk, rank, step, granule], the rank a half of the columns.
    row_nests = []
    for block in (reduce, sch.get_sblock("dx")):
        loops = sch.get_loops(block)
        rows = sch.split(loops[0], [kernel.parts, None, kernel.granule])
        if c.split:
            rank = loops[1] if block == reduce else sch.split(loops[1], [c.split, None])[0]
            rows = (rows[0], rank, *rows[1:])
            sch.reorder(*rows)
        row_nests.append(rows)
    accumulators, write_backs = [], []
    for name in ("dgamma_part", "dbeta_part"):
        # The original block now accumulates in registers; the returned one writes them back.
        write_backs.append(sch.cache_write(sch.get_sblock(name), 0, "shared.dyn" if c.shared_acc else c.local))
        acc = sch.get_sblock(name)
        p, j, r = sch.get_loops(acc)
        ranks = ()
        if c.split:
            rank, j = sch.split(j, [c.split, None])
            ranks = (rank,)
        sch.reorder(p, *ranks, r, j)
        row_nests.append((p, *ranks, *sch.split(r, [None, kernel.granule])))
        accumulators.append(acc)
    # compute_at cannot line these up (the partials do not consume dx), so merge the nests' loops.
    merged = [sch.merge(*[n[level] for n in row_nests]) for level in range(len(row_nests[0]))]
    return merged, accumulators, write_backs


def _shape_steps(sch: s_tir.Schedule, c: _Choices, merged: list) -> tuple:
    """The merged loops as (chunk, outer, step, row), a step holding `rows_per_step` rows."""
    chunk, step, row = merged[0], merged[-2], merged[-1]
    outer = merged[1] if c.split else chunk  # what a block covers: its chunk of rows (and its half)
    if c.rows_per_step == 1 and c.prefetch:
        # A loop of one row inside the step: the pipelined step's body then lists the copies and
        # this loop, which cross-thread reduction lowering leaves one statement.
        step, row = sch.split(sch.fuse(step, row), [None, 1])
    elif c.rows_per_step == 1:
        step = row = sch.fuse(step, row)
    else:
        # The row caches below sit at the step: all its rows are loaded before the first reduction.
        sch.annotate(step, ROWS_PER_STEP_KEY, c.rows_per_step)
        # Unrolled so the caches' row slots are constants (registers), but by nvcc: TVM's explicit
        # unrolling copies the cross-thread allreduce and leaves its result variable undefined.
        sch.unroll(row)
        sch.annotate(row, "pragma_unroll_explicit", 0)
    return chunk, outer, step, row


def _place_reductions(sch: s_tir.Schedule, c: _Choices, reduce, write_backs: list, outer, row, row_lanes) -> None:
    """The partials written back once a block; the row sums (and per-row scalars) once a row, in
    registers."""
    for write_back in write_backs:
        sch.reverse_compute_at(write_back, outer)
    for index in (0, 1):  # c1, c2
        sch.set_scope(sch.get_sblock("c"), index, c.local)
        if c.split:
            sch.set_scope(reduce, index, c.local)
    if c.row_scalars:
        crow = sch.get_sblock("crow")
        sch.compute_at(crow, row)
        sch.set_scope(crow, 0, c.local)
        sch.unroll(sch.get_loops(crow)[-1])
    if c.split:  # after its consumers: the block that adds the halves, the cluster exchange later
        sch.compute_at(sch.get_sblock("c"), row)
    if row_lanes is not None:
        cpu.vectorize_lanes(sch, row_lanes, row)


def _place_stages(sch: s_tir.Schedule, c: _Choices, outer, row) -> tuple:
    """The kept stages once a row (gamma widened once a block), in registers or shared memory.
    Returns dx's block and the blocks that read x and dy."""
    dx = sch.get_sblock("dx")
    readers = {"x": sch.get_sblock("xhat"), "dy": sch.get_sblock("dyf")} if c.staged else {"x": dx, "dy": dx}
    for name in (n for n in ("xhat", "dyg", "dyf", "gammaf") if n in c.kept):  # consumers before producers
        sch.compute_at(sch.get_sblock(name), outer if name == "gammaf" else row)
        shared = name == "gammaf" and c.cache_gamma == GAMMA_SHARED
        sch.set_scope(sch.get_sblock(name), 0, "shared.dyn" if shared else c.local)
    return dx, readers


def _cache_rows(sch: s_tir.Schedule, c: _Choices, dx, readers: dict, outer, step) -> tuple[list, list, object]:
    """Register caches of x and dy a step (and their shared-memory copies when prefetching), and of
    gamma a block. Returns the caches, the copies and gamma's cache (None without one)."""
    caches = []
    # Every reader of x, dy and gamma shares its cache, so no consumer_blocks: trace simplification
    # drops the get_sblock instructions that only feed such a list.
    for buffer in ("x", "dy") if c.cache_rows else ():
        cache = sch.cache_read(readers[buffer], read_index(sch, readers[buffer], buffer), c.local)
        sch.compute_at(cache, step)
        if c.rows_per_step > 1:
            # Steps start at an even row (chunks are `granule` multiples), so row % step names the
            # slot; left to buffer compaction, symbolic M's bounds check keeps the cache M rows long.
            sch.transform_layout(
                cache, ("write", 0), lambda i, j: (i % c.rows_per_step, j), assume_injective_transform=True
            )
            sch.unroll(sch.get_loops(cache)[-2])  # the step's rows; the row's own loop is split below
        caches.append(cache)
    copies = [sch.cache_read(cache, 0, "shared.dyn") for cache in caches] if c.prefetch else []
    for copy in copies:
        sch.compute_at(copy, step)
        if c.rows_per_step > 1:
            sch.unroll(sch.get_loops(copy)[-2])
    gamma_cache = None
    if c.cache_gamma and "gammaf" not in c.kept:
        reader = sch.get_sblock("dyg") if "dyg" in c.kept else dx
        gamma_cache = sch.cache_read(reader, read_index(sch, reader, "gamma"), c.local)
        sch.compute_at(gamma_cache, outer)
        caches.append(gamma_cache)
    return caches, copies, gamma_cache


def _bind_chunks(sch: s_tir.Schedule, c: _Choices, chunk, outer) -> None:
    """A chunk of rows a thread block (a cluster, its halves the ranks; a CPU thread), and the
    minimum blocks per SM that threads_per_sm asks of ptxas."""
    if c.split:
        sch.bind(chunk, cluster.CHUNK_AXIS)
        sch.bind(outer, cluster.RANK_AXIS)
    elif c.gpu:
        sch.bind(chunk, "blockIdx.x")
    else:
        sch.parallel(chunk)
    if c.threads_per_sm:
        if not isinstance(c.threads, int):
            raise ValueError("threads_per_sm needs a fixed thread count (it is not a tuning structure)")
        sch.annotate(chunk, MIN_BLOCKS_KEY, max(1, c.threads_per_sm // c.threads))


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
