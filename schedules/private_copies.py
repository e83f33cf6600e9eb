"""Block barriers that a prefetching backward's software pipeline does not need (CUDA).

A prefetching backward (`one_pass_backward`'s `prefetch`) copies the x and dy rows of a later
step into shared memory with cp.async, and reads them back into registers at that step. TVM's
pipeline puts a block barrier (__syncthreads) after each wait for the copies and ThreadSync one
before each copy into a buffer that was read one step before: it cannot see that the copy and
the read are spread over the threads alike (the same `layout.spread_row` layout), so that each thread
reads back only the bytes it copied itself. A thread's own cp.async writes are visible to it
after its cp.async.wait_group, and its read of a buffer slot has returned (the row's arithmetic
used it) before it issues, later in its own program order, the copy that refills the slot. Those
two barriers a row are what this removes, in the device kernels of functions marked
`PRIVATE_KEY`; the row allreduce's own barriers stay (a one-warp row has none).
"""

from __future__ import annotations

import tvm
from tvm import tirx

from schedules import tir_tree

PRIVATE_KEY = "lntune.thread_private_copies"  # function attribute: its pipelined copies are per-thread
# Attributes InjectSoftwarePipeline wraps a step's copies, and the wait for them, in.
_ASYNC_SCOPES = ("async_commit_queue_scope", "async_wait_queue_scope", "async_wait_inflight_count")


def _is_barrier(stmt: tirx.Stmt) -> bool:
    value = stmt.value if isinstance(stmt, tirx.Evaluate) else None
    return isinstance(value, tvm.ir.expr.Call) and getattr(value.op, "name", "") == "tirx.tvm_storage_sync"


def _without_barriers(stmt: tirx.Stmt) -> tirx.Stmt:
    """The body of an async-copy scope without its top-level barriers (nested scopes too)."""
    if isinstance(stmt, tirx.SeqStmt):
        kept = [_without_barriers(s) for s in stmt.seq if not _is_barrier(s)]
        return tirx.SeqStmt(kept) if len(kept) != 1 else kept[0]
    if isinstance(stmt, tirx.AttrStmt) and stmt.attr_key in _ASYNC_SCOPES:
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, _without_barriers(stmt.body))
    if _is_barrier(stmt):
        return tirx.Evaluate(0)
    return stmt


def drop_pipeline_barriers(stmt: tirx.Stmt) -> tirx.Stmt:
    """`stmt` (a lowered kernel body) with the barriers inside its async-copy scopes removed."""

    def scope(node: tirx.Stmt) -> tirx.Stmt | None:
        return _without_barriers(node) if isinstance(node, tirx.AttrStmt) and node.attr_key in _ASYNC_SCOPES else None

    return tir_tree.rewrite(stmt, scope)


def without_pipeline_barriers(kernel: tirx.PrimFunc) -> tirx.PrimFunc:
    """A device kernel (lowered, split from its host function) rid of its pipeline barriers."""
    return kernel.with_body(drop_pipeline_barriers(kernel.body))
