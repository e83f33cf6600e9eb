"""lntune's TIR pipeline: TVM's (s_tir) lowering, then the device-kernel rewrites that scheduled
functions ask for by attribute. Rewrites that need the kernels split from the host code (launch
parameters, pipeline barriers) cannot be made on the scheduled function itself."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm.tirx import PrimFunc
from tvm.tirx.compilation_pipeline import get_tir_pipeline, register_tir_pipeline

from schedules import dependent_launch, private_copies

PIPELINE = "lntune"


def _marked(mod: tvm.IRModule, key: str) -> set[str]:
    """Names of the functions of `mod` carrying the attribute `key`."""
    return {gv.name_hint for gv, f in mod.functions.items() if f.attrs and f.attrs.get(key)}


def _rewrite_kernels(mod: tvm.IRModule, names: set[str], rewrite: Callable[[PrimFunc], PrimFunc]) -> tvm.IRModule:
    """`mod` (lowered, split into host and device functions) with `rewrite` applied to the device
    kernels of the functions `names`: those with launch parameters named `<name>_kernel...` (the
    attribute stays on the function TVM splits them from, whose name they extend)."""
    updates = {
        gv: rewrite(f)
        for gv, f in mod.functions.items()
        if f.attrs
        and f.attrs.get(dependent_launch.LAUNCH_PARAMS) is not None
        and any(gv.name_hint.startswith(f"{name}_kernel") for name in names)
    }
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def _with_kernel_rewrites(lower: tvm.transform.Pass) -> tvm.transform.Pass:
    """`lower`, then each marked function's device kernels rewritten (the marks read before
    lowering: the kernels split from a function extend its name)."""

    @tvm.transform.module_pass(opt_level=0, name="lntune.RewriteKernels")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        dependents = _marked(mod, dependent_launch.DEPENDENT_KEY)
        private = _marked(mod, private_copies.PRIVATE_KEY)
        mod = lower(mod)
        mod = _rewrite_kernels(mod, dependents, dependent_launch.with_launch_flag)
        return _rewrite_kernels(mod, private, private_copies.without_pipeline_barriers)

    return run


def _pipeline():
    lower, finalize_host, finalize_device = get_tir_pipeline("s_tir")
    return _with_kernel_rewrites(lower), finalize_host, finalize_device


register_tir_pipeline(PIPELINE, _pipeline)
