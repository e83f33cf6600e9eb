"""Rewriting a PrimFunc's tree where schedule primitives cannot reach: a scheduled function's (a
launch-bounds attribute, the cluster exchange) and a lowered kernel's (its pipeline barriers).
TVM 0.27's Python has no statement mutator for these nodes, so this walks what those are made of:
loops, sequences and blocks; attributes, branches and while loops."""

from __future__ import annotations

from collections.abc import Callable

from tvm import s_tir, tirx

Rewriter = Callable[[tirx.Stmt], "tirx.Stmt | None"]

_BLOCK_FIELDS = ("iter_vars", "reads", "writes", "name_hint")
_BLOCK_REST = ("init", "alloc_buffers", "match_buffers", "annotations")


def loop_with(loop: tirx.For, body: tirx.Stmt, annotations=None) -> tirx.For:
    """`loop` with another body (and annotations, when given); its step, if any, kept."""
    annotations = loop.annotations if annotations is None else annotations
    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, annotations, loop.step)


def rewrite(stmt: tirx.Stmt, f: Rewriter) -> tirx.Stmt:
    """`stmt` with f applied top-down to loops, sequences, blocks, attributes, branches and while
    loops: where f returns a replacement, that is the subtree (f recurses itself if it wants);
    where None, the children are rewritten. Other statements (a block's leaves) stay as they are."""
    new = f(stmt)
    if new is not None:
        return new
    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([rewrite(s, f) for s in stmt.seq])
    if isinstance(stmt, tirx.For):
        return loop_with(stmt, rewrite(stmt.body, f))
    if isinstance(stmt, tirx.AttrStmt):
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, rewrite(stmt.body, f))
    if isinstance(stmt, tirx.IfThenElse):
        other = rewrite(stmt.else_case, f) if stmt.else_case is not None else None
        return tirx.IfThenElse(stmt.condition, rewrite(stmt.then_case, f), other)
    if isinstance(stmt, tirx.While):
        return tirx.While(stmt.condition, rewrite(stmt.body, f))
    if isinstance(stmt, s_tir.SBlockRealize):
        block = stmt.block
        body = rewrite(block.body, f)
        fields = (*(getattr(block, n) for n in _BLOCK_FIELDS), body, *(getattr(block, n) for n in _BLOCK_REST))
        return s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, s_tir.SBlock(*fields))
    return stmt


def find(stmt: tirx.Stmt, match: Callable[[tirx.Stmt], bool]) -> list[tirx.Stmt]:
    """The loops, sequences and blocks under `stmt` (itself included) that `match`, in order."""
    found = []

    def visit(node):
        if match(node):
            found.append(node)

    rewrite(stmt, visit)
    return found
