"""lntune's TIR pipeline: TVM's (s_tir) lowering, then the device-kernel rewrites that scheduled
functions ask for by attribute. Rewrites that need the kernels split from the host code (launch
parameters, pipeline barriers) cannot be made on the scheduled function itself."""

from __future__ import annotations

import tvm
from tvm.tirx.compilation_pipeline import get_tir_pipeline, register_tir_pipeline

from schedules import dependent_launch, private_copies

PIPELINE = "lntune"


def _marked(mod: tvm.IRModule, key: str) -> set[str]:
    """Names of the functions of `mod` carrying the attribute `key`."""
    return {gv.name_hint for gv, f in mod.functions.items() if f.attrs and f.attrs.get(key)}


def _with_kernel_rewrites(lower: tvm.transform.Pass) -> tvm.transform.Pass:
    """`lower`, then each marked function's device kernels rewritten (the marks read before
    lowering: the kernels split from a function extend its name)."""

    @tvm.transform.module_pass(opt_level=0, name="lntune.RewriteKernels")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        dependents = _marked(mod, dependent_launch.DEPENDENT_KEY)
        private = _marked(mod, private_copies.PRIVATE_KEY)
        mod = lower(mod)
        mod = dependent_launch.tag_kernels(mod, dependents)
        return private_copies.apply(mod, private)

    return run


def _pipeline():
    lower, finalize_host, finalize_device = get_tir_pipeline("s_tir")
    return _with_kernel_rewrites(lower), finalize_host, finalize_device


register_tir_pipeline(PIPELINE, _pipeline)
