"""Rewrites of a scheduled function that are not schedule primitives: the launch bounds a backward
asks for (a loop annotation turned into TVM's attribute) and the Bind-free pair reduction that a
CPU bfloat16 backward needs to build."""

from __future__ import annotations

from tvm import s_tir
from tvm.tirx import AttrStmt, For, IntImm, PrimFunc

from schedules import tir_tree
from schedules.layout import legalized_bf16
from schedules.targets import TargetInfo
from te_ops.layer_norm import Kernel

# The loop annotation that carries a CUDA backward's minimum blocks per SM (schedules.backward's
# threads_per_sm) to with_launch_bounds.
MIN_BLOCKS_KEY = "lntune.min_blocks_per_sm"


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


def needs_unbound_pair(kernel: Kernel, target: TargetInfo) -> bool:
    """A CPU bfloat16 backward: its pair reduction must take the Bind-free form to build."""
    return kernel.op == "backward" and not target.is_gpu and legalized_bf16(kernel, target)


def unbind_pair_reduction(sch: s_tir.Schedule) -> None:
    """Rewrite block "c" from `v0 = c1 + a; v1 = c2 + b; c1 = v0; c2 = v1` to `c1 = c1 + a; c2 = c2 + b`.

    The Bind form is what GPU cross-thread reduction needs, and what breaks bf16 legalization
    (legalized_bf16); a CPU reduces within a thread, so there it takes the Bind-free form (the two
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
