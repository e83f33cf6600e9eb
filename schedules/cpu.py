"""The CPU (llvm) design spaces, and the host facts an llvm export is made for.

Rows run in parallel over TVM's runtime thread pool: a `parallel` loop over the rows (forward) or
the backward's P chunks compiles to TVMBackendParallelLaunch with num_task 0, and each task takes
its share of the loop at run time, so the library uses as many threads as the pool of the process
that loads it has (TVM_NUM_THREADS, or `configure_thread_pool`), whatever host exported it.

What made the CPU kernels slow was not memory: every row reduction (the forward's sum and pair of
sums, the backward's c1/c2 pair) was one scalar accumulator, 1024 dependent adds a row at N = 1024.
Here each row reduction is rfactored over `accumulators` x vector-width lanes (a sampled knob): the
row is summed into that many independent vector accumulators, which are then added up in a fixed
order, so results stay deterministic. The rest is vectorized over N.
"""

from __future__ import annotations

from tvm import s_tir

from schedules.knobs import annotate_unroll
from schedules.targets import TargetInfo
from te_ops.layer_norm import Kernel

VECTOR_BYTES = 32  # one AVX2 register: LLVM splits wider vectors (more accumulators) itself
ACCUMULATORS = (1, 2, 4, 8)  # vectors of partial sums in a row reduction (appended, never inserted)
SUM_COLUMNS = (1, 2, 4, 8, 16)  # vectors of columns a task of the partials sum covers
UNROLL_STEPS = (0, 16, 64, 512)
ROW_MOMENTS = ("x_sum", "x_dev")  # the forward's row reductions (te_ops' _row_moments)
ROW_STAGES = ("x_sum", "x_shift", "x_dev", "x_terms")
# Per-row buffers (row sums, lanes, stages) in "global" scope: TVM places those of a constant size
# under 1 KB on the stack (LowerTVMBuiltin), where LLVM keeps them in registers; "local" ones are
# TVMBackendAllocWorkspace calls, made again every row (8 calls a row in the forward: 1.3 ms of
# a 2.6 ms forward at M = 4096, N = 1024 on 1 core).
SCOPE = "global"
PARTS_PER_THREAD = 4  # backward chunks a thread of the exporting host gets (load balance)
MIN_PARTS = 16


def vector_width(kernel: Kernel) -> int:
    """Elements of one VECTOR_BYTES vector of the row's dtype, halved until it divides N."""
    width = VECTOR_BYTES // (4 if kernel.dtype == "float32" else 2)
    while kernel.hidden % width:
        width //= 2
    return width


def parts_for(target: TargetInfo) -> int:
    """P for a CPU backward: a few chunks per core of the exporting host, so that the runtime pool's
    static split stays balanced on a host with somewhat more or fewer cores; the sum's cost (2 P N
    floats) stays small against the rows."""
    return max(MIN_PARTS, PARTS_PER_THREAD * target.cores)


def default_knobs(kernel: Kernel) -> dict[str, int]:
    """The CPU baseline. The backward reads x and dy again for dx and the partials instead of
    copying each row into a cache first (the row is still in L1 or L2 then): 2.6 ms against 3.5
    at M = 4096, N = 1024 float32 on 2 cores. Four vector accumulators a row sum."""
    if kernel.op == "backward":
        return {"cache_rows": 0, "cache_gamma": 0, "chunked": 0, "rows_per_step": 1, "accumulators": 4}
    if kernel.op == "backward_sum":
        return {"columns": 4, "unroll": 0}
    return {"accumulators": 4, "unroll": 16}


def structures(kernel: Kernel) -> list[dict[str, int]]:
    """The CPU backward's tuning structures: rows re-read (the baseline's) and rows copied into
    caches first, each with gamma re-read; MetaSchedule samples the accumulators within each."""
    return [{"cache_rows": 0, "cache_gamma": 0}, {"cache_rows": 1, "cache_gamma": 0}]


def legalized_bf16(kernel: Kernel) -> bool:
    """bfloat16 is emulated in float32 on CPUs (see layout.legalized_bf16)."""
    return kernel.dtype == "bfloat16"


def accumulator_candidates(kernel: Kernel) -> list[int]:
    """Vector accumulators a row sum may use: those that divide the row's vectors and leave both
    loops (over lanes, and over the row) longer than 1 (TVM drops unit loops, and the schedule
    indexes them). None for rows too short for that (N = 1, or N odd and under 4): summed serially."""
    vec = vector_width(kernel)
    units = kernel.hidden // vec
    return [a for a in ACCUMULATORS if units % a == 0 and a * vec >= 2 and units // a >= 2]


def rfactor_lanes(sch: s_tir.Schedule, name: str, kernel: Kernel, knobs):
    """Split block `name`'s reduction (its innermost loop, over N) into [outer, lanes] lanes =
    accumulators x vector width, and rfactor the lanes: returns the block that sums each lane over
    the row (schedule it with `vectorize_lanes` once it sits where it runs), or None for a row
    too short to split (accumulator_candidates). Call it before the block's loops are merged or
    moved: rfactor needs the block alone in its nest."""
    accs = accumulator_candidates(kernel)
    if not accs:
        return None
    vec = vector_width(kernel)
    acc = knobs.pick(sch, "accumulators", accs)
    block = sch.get_sblock(name)
    loop = sch.get_loops(block)[-1]
    _, accs_loop, lane = sch.split(loop, [None, acc, vec])
    return sch.rfactor(sch.fuse(accs_loop, lane), 0)


def vectorize_lanes(sch: s_tir.Schedule, rf, row) -> None:
    """Put an rfactored lanes block at `row`: its accumulators in registers, the row's outer loop
    outside and the lanes vectorized inside (decompose_lanes initializes them)."""
    sch.compute_at(rf, row)
    for index in range(len(sch.get(rf).writes)):
        sch.set_scope(rf, index, SCOPE)
    lanes, outer = sch.get_loops(rf)[-2:]
    sch.reorder(outer, lanes)
    sch.vectorize(lanes)


def decompose_lanes(sch: s_tir.Schedule, rf) -> None:
    """Initialize an rfactored lanes block once a row, vectorized. Last: the loops above a
    decomposed reduction can no longer be bound or parallelized ("compact dataflow")."""
    init = sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
    sch.vectorize(sch.get_loops(init)[-1])


def one_pass_over_row(sch: s_tir.Schedule, blocks, kernel: Kernel) -> None:
    """The backward's dx and its dgamma/dbeta updates in one loop over the row's vectors (each
    block keeps its own vectorized lanes inside): x and dy are loaded and xhat computed once an
    element for the three, where three loops reloaded them from L1."""
    if kernel.hidden // vector_width(kernel) < 2:  # no loop over the row's vectors (N = 1)
        return
    sch.merge(*[sch.get_loops(block)[-2] for block in blocks])


def _vectorize_row(sch: s_tir.Schedule, block, vec: int) -> None:
    """Split a block's innermost loop (over N) into [outer, vec] and vectorize the vec lanes
    (vec 1: N odd, or N = 1, where the loop over N is gone)."""
    if vec == 1:
        return
    _, inner = sch.split(sch.get_loops(block)[-1], [None, vec])
    sch.vectorize(inner)


def rowwise(sch: s_tir.Schedule, kernel: Kernel, target: TargetInfo, knobs) -> None:
    """forward / forward_stats: rows in parallel; each row's two reductions over vector
    accumulators (rfactor_lanes), y vectorized over N. x is read from the caches three times (a row
    of 16 KB and less stays in L1); no copy of it is made, but bfloat16 is widened once a row."""
    vec = vector_width(kernel)
    outputs = (["y"] if kernel.op == "forward" else []) + ["mean", "rstd"]
    if not legalized_bf16(kernel):
        sch.compute_inline(sch.get_sblock("x_f32"))
    lanes = {name: rfactor_lanes(sch, name, kernel, knobs) for name in ROW_MOMENTS}
    lanes = {name: rf for name, rf in lanes.items() if rf is not None}
    row = sch.merge(*[sch.get_loops(sch.get_sblock(b))[0] for b in outputs])
    sch.parallel(row)
    for name in ROW_STAGES[::-1]:  # consumers before producers
        block = sch.get_sblock(name)
        sch.compute_at(block, row)
        for index in range(len(sch.get(block).writes)):
            sch.set_scope(block, index, SCOPE)
        loops = sch.get_loops(block)
        if len(loops) > 1:  # the lanes, or the stage's few elements (none where N = 1)
            sch.unroll(loops[-1])
        if name in lanes:
            vectorize_lanes(sch, lanes[name], row)
    if legalized_bf16(kernel):
        x_f32 = sch.get_sblock("x_f32")
        sch.compute_at(x_f32, row)
        sch.set_scope(x_f32, 0, SCOPE)
        _vectorize_row(sch, x_f32, vec)
    if kernel.op == "forward":
        _vectorize_row(sch, sch.get_sblock("y"), vec)
    for rf in lanes.values():
        decompose_lanes(sch, rf)
    annotate_unroll(sch, row, knobs.pick(sch, "unroll", UNROLL_STEPS))


def partials_sum(sch: s_tir.Schedule, kernel: Kernel, target: TargetInfo, knobs) -> None:
    """dgamma/dbeta from [P, N] partials: column slices of `columns` vectors in parallel, each
    adding its P rows in order (deterministic) into vector accumulators."""
    vec = vector_width(kernel)
    units = kernel.hidden // vec
    widths = [c for c in SUM_COLUMNS if units % c == 0 and c * vec >= 2]
    if not widths:  # N = 1: one column, summed serially
        sch.parallel(sch.merge(*[sch.get_loops(sch.get_sblock(b))[0] for b in ("dgamma", "dbeta")]))
        return
    width = knobs.pick(sch, "columns", widths)
    splits = [sch.split(sch.get_loops(sch.get_sblock(b))[0], [None, width, vec]) for b in ("dgamma", "dbeta")]
    outer = sch.merge(*[s[0] for s in splits])
    sch.parallel(outer)
    for (_, _, inner), name in zip(splits, ("dgamma", "dbeta"), strict=True):
        sch.vectorize(inner)
        acc = sch.get_sblock(name + "_acc")
        sch.compute_at(acc, outer)
        sch.set_scope(acc, 0, SCOPE)
        columns, part = sch.get_loops(acc)[-2:]
        sch.reorder(part, columns)
        sch.vectorize(columns)  # width x vec lanes: LLVM splits them into registers
        init = sch.decompose_reduction(acc, part)
        sch.vectorize(sch.get_loops(init)[-1])
    annotate_unroll(sch, outer, knobs.pick(sch, "unroll", UNROLL_STEPS))


__all__ = [
    "accumulator_candidates",
    "decompose_lanes",
    "default_knobs",
    "parts_for",
    "partials_sum",
    "one_pass_over_row",
    "rfactor_lanes",
    "rowwise",
    "structures",
    "vectorize_lanes",
]
