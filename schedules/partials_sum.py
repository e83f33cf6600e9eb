"""The partials sum: dgamma/dbeta from the backward's [P, N] fp32 partials, coalesced across
columns, in a fixed order."""

from __future__ import annotations

from tvm import s_tir

from schedules.layout import unroll_by_knob, vector_width
from schedules.targets import TargetInfo
from te_ops.layer_norm import Kernel

# Knob values are appended, never inserted, so tuned decisions and variant labels keep their meaning.
# A column slice of 8 floats is one 32-byte sector: narrow slices give short rows more blocks.
SUM_COLUMNS = (32, 64, 128, 256, 8, 16)
SUM_LANES = (1, 2, 4, 8, 16, 32, 64, 128)  # columns x lanes > max_threads is rejected by VerifyGPUCode
FIRST_SUM_GRID = (4, 6)  # how many of each the first sessions' variant labels were numbered over


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
        unroll_by_knob(sch, outer, knobs)
