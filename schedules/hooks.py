"""lntune's changes to TVM's code generation, in force only inside lntune's own builds.

`installed(target)` wraps a build (lntune.build.compile_module, the MetaSchedule builder of
schedules.tune, lntune.relax.build) and, while the outermost one is open anywhere in the process:

- registers lntune's TIR pipeline under `pipeline.PIPELINE` (schedules.pipeline);
- chains lntune's CUDA source rewrites (schedules.cuda_source) after the `tvm_callback_cuda_postproc`
  there was before;
- replaces TVM's cp.async codegen entries with ones whose helper takes a 64-bit global offset;
- registers `tvm_callback_cuda_compile`, so a CUDA module built where a driver is loaded holds a cubin
  for the target's architecture (lntune.toolchain.cuda_binary) rather than the device's.

After the outermost block everything is as it was: a hook that was absent is removed again. Blocks nest
and may be open in several threads at once (a count under a lock); a thread that is not inside one,
building while another thread is, meets the hooks acting as what they replaced, since each of them
acts for the threads inside a block only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import tvm_ffi

from schedules import cluster, cuda_source, pipeline  # noqa: F401  (cluster registers its CUDA rewrites)

COMPILE = "tvm_callback_cuda_compile"
CP_ASYNC_OPS = ("tirx.s_tir_cp_async_raw", "tirx.s_tir.cp_async_raw")
WIDENED_SUFFIX = "_i64"

_lock = threading.RLock()
_depth = 0  # open blocks in the process
_saved: dict[str, object] = {}  # what the hooks replaced
_local = threading.local()  # .targets: this thread's open blocks' targets; .expected: see expect_rewrites


def active() -> bool:
    """Whether this thread is inside an `installed` block."""
    return bool(getattr(_local, "targets", None))


def current_target():
    """The target of this thread's innermost block (None when it gave none)."""
    return _local.targets[-1] if active() else None


@contextmanager
def installed(target=None) -> Iterator[None]:
    """lntune's hooks in force for the block (see the module's doc). `target`: a TVM Target, a target
    dict or a schedules.targets.TargetInfo, for the architecture CUDA code is compiled for."""
    global _depth
    with _lock:
        if _depth == 0:
            _install()
        _depth += 1
    _local.targets = [*getattr(_local, "targets", []), target]
    try:
        yield
    finally:
        _local.targets = _local.targets[:-1]
        with _lock:
            _depth -= 1
            if _depth == 0:
                _uninstall()


def expect_rewrites(wants: dict[str, set[str]]) -> None:
    """Note, for this thread's next CUDA source, the rewrites each device kernel asks for (the TIR
    pipeline's last step; the post-processor checks them)."""
    _local.expected = wants


def _postproc(code, target):
    previous = _saved.get(cuda_source.POSTPROC)
    code = previous(code, target) if previous is not None else code
    if not active():
        return code
    expected, _local.expected = getattr(_local, "expected", {}), {}
    code = cuda_source.rewrite_source(str(code), expected)
    _check_cp_async(code, [k for k, wants in expected.items() if pipeline.CP_ASYNC in wants])
    return code


def _check_cp_async(code: str, kernels: list[str]) -> None:
    texts = cuda_source.kernel_text(code)
    unwidened = [k for k in kernels if WIDENED_SUFFIX + "(" not in texts.get(k, "")]
    if unwidened:
        raise cuda_source.RewriteMissing(
            f"lntune: kernel(s) {unwidened} copy with cp.async, but their CUDA source has no cp.async helper with "
            f"a 64-bit offset (TVM's cp.async codegen entries {CP_ASYNC_OPS} were not found or not used: a TVM "
            "upgrade?); past 2**31 bytes such a copy would read the wrong address"
        )


def _compile(code):
    if not active():
        return _saved[COMPILE](code)
    from lntune import toolchain  # here: lntune imports schedules

    return bytearray(toolchain.cuda_binary(str(code), toolchain.cuda_arch(current_target())))


def _widened(original):
    from tvm.backend.cuda.op import cuda_func_call

    def widened(arg_list):
        call, tags = original(arg_list)
        if not active():
            return call, tags
        name, *operands, source = call.args
        wide = source.value.replace(f"{name.value}(", f"{name.value}{WIDENED_SUFFIX}(")
        wide = wide.replace("void* src, int src_off", "void* src, long long src_off")
        if "long long src_off" not in wide or f"{name.value}{WIDENED_SUFFIX}(" not in wide:
            raise cuda_source.RewriteMissing(
                f"lntune: unexpected cp.async helper from TVM, its offset not widened:\n{source.value}"
            )
        return cuda_func_call(f"{name.value}{WIDENED_SUFFIX}", *operands, source_code=wide), tags

    widened.lntune_original = original
    return widened


def _install() -> None:
    import tvm.support.nvcc  # noqa: F401  (TVM's own compile callback, which ours falls back to)
    from tvm.backend.cuda.codegen.registry import CODEGEN_REGISTRY
    from tvm.tirx.compilation_pipeline import PIPELINE_MAP

    _saved.clear()
    _saved[cuda_source.POSTPROC] = tvm_ffi.get_global_func(cuda_source.POSTPROC, allow_missing=True)
    _saved[COMPILE] = tvm_ffi.get_global_func(COMPILE, allow_missing=True)
    for name, ours in ((cuda_source.POSTPROC, _postproc), (COMPILE, _compile)):
        tvm_ffi.register_global_func(name, ours, override=True)
        _saved[f"ours:{name}"] = tvm_ffi.get_global_func(name)
    _saved["pipeline"] = PIPELINE_MAP.get(pipeline.PIPELINE)
    PIPELINE_MAP[pipeline.PIPELINE] = pipeline.factory
    _saved["codegen"] = {op: CODEGEN_REGISTRY[op] for op in CP_ASYNC_OPS if op in CODEGEN_REGISTRY}
    for op, original in _saved["codegen"].items():
        CODEGEN_REGISTRY[op] = _widened(original)


def _uninstall() -> None:
    from tvm.backend.cuda.codegen.registry import CODEGEN_REGISTRY
    from tvm.tirx.compilation_pipeline import PIPELINE_MAP

    for name in (cuda_source.POSTPROC, COMPILE):
        previous = _saved.get(name)
        current = tvm_ffi.get_global_func(name, allow_missing=True)
        if current is None or not current.same_as(_saved[f"ours:{name}"]):
            continue  # replaced by someone else meanwhile: theirs stays
        if previous is None:
            tvm_ffi.remove_global_func(name)
        else:
            tvm_ffi.register_global_func(name, previous, override=True)
    if PIPELINE_MAP.get(pipeline.PIPELINE) is pipeline.factory:
        if _saved.get("pipeline") is None:
            del PIPELINE_MAP[pipeline.PIPELINE]
        else:
            PIPELINE_MAP[pipeline.PIPELINE] = _saved["pipeline"]
    for op, original in _saved.get("codegen", {}).items():
        if getattr(CODEGEN_REGISTRY.get(op), "lntune_original", None) is original:
            CODEGEN_REGISTRY[op] = original
    _saved.clear()
