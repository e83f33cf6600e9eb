"""The variants `lntune select` times besides the tuned or baseline knobs (CUDA backward and partials
sum). A recorded selection names a variant by its position here (variant<i>), so new variants are
appended, never inserted."""

from __future__ import annotations

import itertools

from schedules import cluster
from schedules.backward import GAMMA_SHARED, PREFETCH, ROWS_PER_STEP, STAGE_ROWS, THREADS_PER_SM, clusterable, steps_for
from schedules.estimates import REGISTERS_PER_SM, registers_needed, shared_bytes_needed
from schedules.layout import block_kernel, thread_candidates
from schedules.partials_sum import FIRST_SUM_GRID, SUM_COLUMNS, SUM_LANES
from schedules.rules import default_knobs
from schedules.targets import TargetInfo
from te_ops.layer_norm import ROW_GRANULE, Kernel


def variants(kernel: Kernel, target: TargetInfo, base: dict) -> list[dict[str, int]]:
    """Knob sets besides `base` that `lntune select` times as exported (CUDA backward and its sum)."""
    if target.family != "cuda":
        return []
    if kernel.op == "backward":
        return _backward_variants(kernel, target, base)
    if kernel.op == "backward_sum":
        return _sum_variants(kernel, target, base)
    return []


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
    half = block_kernel(kernel, cluster.SIZE)
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
    return SUM_COLUMNS.index(columns) >= FIRST_SUM_GRID[0] or SUM_LANES.index(lanes) >= FIRST_SUM_GRID[1]


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
