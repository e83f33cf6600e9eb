"""Design spaces: one schedule function per shape of work, parametrized by the target's facts, and
the dispatch from a kernel's op to its function.

- `schedules.rowwise`: forward and forward statistics.
- `schedules.backward`: dx and the fp32 dgamma/dbeta partials in one kernel (the one-pass backward).
- `schedules.partials_sum`: adds the P partials per column in a fixed order.
- `schedules.cpu`: the llvm schedules of the row-wise kernels and the sum.

Their building blocks are in `schedules.layout` and `schedules.rewrites`; the baseline knobs and the P
rule in `schedules.rules`, select's variant grid in `schedules.variants`, register and shared-memory
estimates in `schedules.estimates`.

Each function takes `knobs` (schedules.knobs): Sampled for a MetaSchedule design space, Fixed for a
baseline or a replayed tuned record. Python never branches on a knob's value, so a trace replays.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import s_tir

from schedules import cpu
from schedules.backward import one_pass_backward
from schedules.knobs import Recorder
from schedules.layout import legalized_bf16
from schedules.partials_sum import partials_sum
from schedules.rowwise import rowwise
from schedules.targets import TargetInfo
from te_ops.layer_norm import Kernel

SPACES = {"forward": rowwise, "forward_stats": rowwise, "backward": one_pass_backward, "backward_sum": partials_sum}


# CPUs: schedules.cpu, but for the backward, which shares one_pass_backward (its row sums in cpu).
CPU_SPACES = {**SPACES, "forward": cpu.rowwise, "forward_stats": cpu.rowwise, "backward_sum": cpu.partials_sum}


def apply(sch: s_tir.Schedule, kernel: Kernel, target: TargetInfo, knobs) -> None:
    """Schedule `kernel` in place with the design space of its op."""
    (SPACES if target.is_gpu else CPU_SPACES)[kernel.op](sch, kernel, target, knobs)


def structures(kernel: Kernel, target: TargetInfo) -> list[dict[str, int]]:
    """The structural variants of a kernel's design space (one MetaSchedule design space each)."""
    if kernel.op == "backward" and target.is_gpu:
        cacheable = (0,) if legalized_bf16(kernel, target) else (1, 0)
        return [{"cache_rows": r, "cache_gamma": g, "chunked": c} for r in cacheable for g in cacheable for c in (0, 1)]
    if kernel.op == "backward":
        return cpu.structures(kernel)
    return [{}]


def knob_names(kernel: Kernel, target: TargetInfo) -> Sequence[str]:
    """The knobs of a kernel's design space, in the order its schedule function picks them."""
    recorder = Recorder()
    sch = s_tir.Schedule(kernel.prim_func())
    apply(sch, kernel, target, recorder)
    return recorder.order
