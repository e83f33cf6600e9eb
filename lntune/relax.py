"""TVM Relax hook: legalize `relax.nn.layer_norm` to lntune's scheduled forward kernel, and emit the
backward (dx, dgamma, dbeta) as call_tir to lntune's one-pass backward and partials-sum kernels.

The PrimFuncs are the same ones `lntune export` builds: scheduled from the design spaces with the
tuned (or baseline) knobs for the target, marked `tir.is_scheduled` so Relax's default pipeline leaves
them alone. Inputs of any leading shape are reshaped to rows around the call.

Build a module holding them with `build(mod, target)`: tvm.compile as export compiles (lntune's pass
configuration, so the backwards selected with `prefetch` copy rows with cp.async; its TIR pipeline),
with lntune's hooks in force for that build only (schedules.hooks: the CUDA source rewrites, among
them the cluster launch mark the N >= 8192 backwards on sm_90 need, and 64-bit cp.async offsets).
Importing lntune changes nothing in TVM; a plain tvm.compile of a module with lntune's CUDA backward
kernels builds them without those rewrites, which the cluster kernels cannot run without.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, tirx

from lntune.build import PASS_CONFIG, kernels_for
from schedules import database, hooks, pipeline
from schedules.targets import TargetInfo, get_target
from te_ops.layer_norm import ACC, DTYPES, Kernel

_LAYER_NORM = tvm.ir.Op.get("relax.nn.layer_norm")


def scheduled_prim_func(kernel: Kernel, target: TargetInfo) -> tirx.PrimFunc:
    """The kernel's PrimFunc scheduled with the knobs export would use (tuned when recorded)."""
    choice = database.choose(kernel, target)
    func = database.scheduled(kernel, target, choice.knobs)
    return func.with_attr("tir.is_scheduled", True).with_attr("lntune.schedule", choice.source)


def build(mod: tvm.IRModule, target: str = "llvm", **kwargs):
    """tvm.compile of a Relax module holding lntune's PrimFuncs for `target` (a name from `lntune
    targets`; the host is LLVM), with lntune's pass configuration, TIR pipeline and hooks (see the
    module's doc). Other keyword arguments go to tvm.compile."""
    info = get_target(target)
    with hooks.installed(info), tvm.transform.PassContext(config=PASS_CONFIG):
        tvm_target = tvm.target.Target(info.spec, host="llvm")
        return tvm.compile(mod, target=tvm_target, tir_pipeline=pipeline.PIPELINE, **kwargs)


def _shape(expr: relax.Expr) -> list:
    shape = expr.ty.shape
    return [shape[i] for i in range(len(shape))]


def _supported(call: relax.Call) -> bool:
    data = call.args[0]
    shape, dtype = _shape(data), data.ty.dtype
    axes = [int(a) for a in call.attrs.axes]
    rank = len(shape)
    return (
        dtype in DTYPES
        and call.attrs.center
        and call.attrs.scale
        and all(isinstance(d, tirx.IntImm) for d in shape[-1:])
        and sorted(a % rank for a in axes) == [rank - 1]
    )


@relax.expr_functor.mutator
class _Legalizer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: TargetInfo) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.target = target
        self.added: dict[str, tvm.ir.GlobalVar] = {}

    def _global(self, kernel: Kernel) -> tvm.ir.GlobalVar:
        if kernel.name not in self.added:
            self.added[kernel.name] = self.builder_.add_func(scheduled_prim_func(kernel, self.target), kernel.name)
        return self.added[kernel.name]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != _LAYER_NORM or not _supported(call):
            return call
        data, gamma, beta = call.args
        shape = _shape(data)
        hidden, dtype = int(shape[-1]), data.ty.dtype
        rows = math.prod(shape[:-1]) if all(isinstance(d, tirx.IntImm) for d in shape[:-1]) else None
        if rows is None:
            rows = shape[0]
            for d in shape[1:-1]:
                rows = rows * d
        x2d = self.builder_.emit(relax.op.reshape(data, [rows, hidden]))
        gv = self._global(Kernel("forward", hidden, dtype))
        out = [relax.TensorType([rows, hidden], dtype), relax.TensorType([rows], ACC), relax.TensorType([rows], ACC)]
        eps = relax.prim_value(tirx.FloatImm(ACC, float(call.attrs.epsilon)))
        result = self.builder_.emit(relax.call_tir(gv, [x2d, gamma, beta, eps], out))
        y = self.builder_.emit(relax.TupleGetItem(result, 0))
        return relax.op.reshape(y, shape)

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


def legalize_layer_norm(mod: tvm.IRModule, target: str = "llvm") -> tvm.IRModule:
    """Rewrite every supported `relax.nn.layer_norm` (normalizing the last axis, with gamma and beta,
    a dtype lntune has) into a call_tir of lntune's scheduled forward kernel for `target`."""
    return _Legalizer(mod, get_target(target)).transform()


def emit_layer_norm_backward(
    bb: relax.BlockBuilder,
    dy: relax.Expr,
    x: relax.Expr,
    mean: relax.Expr,
    rstd: relax.Expr,
    gamma: relax.Expr,
    target: str = "llvm",
) -> relax.Expr:
    """Emit dx, dgamma, dbeta (a Relax tuple) for 2-D x/dy [M, N] with the saved float32 mean/rstd [M]."""
    info = get_target(target)
    rows, hidden = _shape(x)
    dtype = x.ty.dtype
    backward, partials_sum = [k for k in kernels_for(int(hidden), dtype, info) if k.op.startswith("backward")]
    funcs = {k.name: bb.add_func(scheduled_prim_func(k, info), k.name) for k in (backward, partials_sum)}
    parts = relax.TensorType([backward.parts, hidden], ACC)
    first = bb.emit(
        relax.call_tir(
            funcs[backward.name], [dy, x, mean, rstd, gamma], [relax.TensorType([rows, hidden], dtype), parts, parts]
        )
    )
    dx = bb.emit(relax.TupleGetItem(first, 0))
    partials = [bb.emit(relax.TupleGetItem(first, i)) for i in (1, 2)]
    sums = bb.emit(
        relax.call_tir(
            funcs[partials_sum.name], partials, [relax.TensorType([hidden], dtype), relax.TensorType([hidden], dtype)]
        )
    )
    return relax.Tuple([dx, bb.emit(relax.TupleGetItem(sums, 0)), bb.emit(relax.TupleGetItem(sums, 1))])
