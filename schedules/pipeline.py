"""lntune's TIR pipeline: TVM's (s_tir) lowering, then the device-kernel rewrites that scheduled
functions ask for by attribute. Rewrites that need the kernels split from the host code (launch
parameters, pipeline barriers) cannot be made on the scheduled function itself.

It is registered with TVM under `PIPELINE` only inside lntune's builds (schedules.hooks). After
lowering it also notes, per CUDA device kernel, which CUDA source rewrites the kernel asks for
(schedules.cuda_source.wanted), for the post-processor that then runs on its source."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm.tirx import PrimFunc
from tvm.tirx.compilation_pipeline import get_tir_pipeline

from schedules import cuda_source, dependent_launch, private_copies

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
        mod = _rewrite_kernels(mod, private, private_copies.without_pipeline_barriers)
        from schedules import hooks  # here: hooks registers this pipeline

        hooks.expect_rewrites(cuda_kernel_wants(mod))
        return mod

    return run


def cuda_kernel_wants(mod: tvm.IRModule) -> dict[str, set[str]]:
    """CUDA device kernel name -> the CUDA source rewrites it asks for (from its lowered TIR), and
    `CP_ASYNC` for a kernel with cp.async copies (whose offsets schedules.hooks widens)."""
    wants = {}
    for gv, f in mod.functions.items():
        target = f.attrs.get("target") if f.attrs else None
        if target is None or target.kind.name != "cuda" or f.attrs.get(dependent_launch.LAUNCH_PARAMS) is None:
            continue
        tir = f.script()
        wants[gv.name_hint] = cuda_source.wanted(tir) | ({CP_ASYNC} if "cp_async" in tir else set())
    return wants


CP_ASYNC = "widened_cp_async"


def factory():
    """The pipeline's factory, as TVM's register_tir_pipeline takes it."""
    lower, finalize_host, finalize_device = get_tir_pipeline("s_tir")
    return _with_kernel_rewrites(lower), finalize_host, finalize_device
