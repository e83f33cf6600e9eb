"""Export: (target, hidden sizes, dtypes) -> one compiled library plus manifest.json.

Every variant is scheduled from the design spaces with the best tuned record for it in
tuning_logs/<target>/ when there is one, else with the baseline knobs; the manifest says which.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import tvm

from lntune import __version__, toolchain
from schedules import database, pipeline
from schedules.targets import TargetInfo, get_target
from te_ops.layer_norm import DTYPE_SPECS, Kernel, parse_dtype_spec

LIBRARY = "lntune.so"
MANIFEST = "manifest.json"
# Lowers the copies that spaces.software_pipeline marks asynchronous to cp.async (the prefetching
# CUDA backward); built without it those copies are plain loads and stores, correct but serial.
PASS_CONFIG = {"tirx.use_async_copy": True}
CP_ASYNC_OPS = ("tirx.s_tir_cp_async_raw", "tirx.s_tir.cp_async_raw")


def widen_cp_async_offsets() -> None:
    """Make TVM 0.27's cp.async helper take its global offset as 64 bits.

    The helper it emits declares `int src_off` and scales it in int, so a copy from past element
    2**30 of a 16-bit tensor (2**29 of float32) reads the wrong address. Each generated helper is
    renamed (`..._i64`) with a `long long` offset; a helper of another shape fails the build loudly.
    """
    from tvm.backend.cuda.codegen.registry import CODEGEN_REGISTRY
    from tvm.backend.cuda.op import cuda_func_call

    for op in CP_ASYNC_OPS:
        original = CODEGEN_REGISTRY.get(op)
        if original is None or getattr(original, "widened", False):
            continue

        def widened(arg_list, original=original):
            call, tags = original(arg_list)
            name, *operands, source = call.args
            wide = source.value.replace(f"{name.value}(", f"{name.value}_i64(")
            wide = wide.replace("void* src, int src_off", "void* src, long long src_off")
            if "long long src_off" not in wide or f"{name.value}_i64(" not in wide:
                raise RuntimeError(f"lntune: unexpected cp.async helper from TVM, not widened:\n{source.value}")
            return cuda_func_call(f"{name.value}_i64", *operands, source_code=wide), tags

        widened.widened = True
        CODEGEN_REGISTRY[op] = widened


widen_cp_async_offsets()  # here, so every build that goes through lntune (export, select, Relax) has it


def compile_module(mod: tvm.IRModule, target: TargetInfo):
    """tvm.compile for `target` with the host as LLVM, lntune's pass configuration and its TIR
    pipeline (TVM's, then the device-kernel rewrites of schedules.pipeline)."""
    with tvm.transform.PassContext(config=PASS_CONFIG):
        tvm_target = tvm.target.Target(target.spec, host="llvm")
        return tvm.compile(mod, target=tvm_target, tir_pipeline=pipeline.PIPELINE)


def device_source(mod: tvm.IRModule, target: TargetInfo) -> str:
    """The device code `compile_module` generates for `mod`: for CUDA the source nvcc compiles,
    lntune's rewrites (schedules.cuda_source) applied."""
    return compile_module(mod, target).mod.imports[0].inspect_source()


def kernel_library(kernel: Kernel, target: TargetInfo, knobs: dict | None = None):
    """`compile_module` of one kernel scheduled with `knobs`; by default the knobs the database
    selects for it."""
    knobs = database.choose(kernel, target).knobs if knobs is None else knobs
    return compile_module(tvm.IRModule({kernel.name: database.scheduled(kernel, target, knobs)}), target)


def kernel_source(kernel: Kernel, target: TargetInfo, knobs: dict | None = None) -> str:
    """The device code of `kernel_library`: for CUDA the source nvcc compiles."""
    return kernel_library(kernel, target, knobs).mod.imports[0].inspect_source()


def kernels_for(
    hidden: int,
    dtype: str,
    target: TargetInfo,
    parts: int | None = None,
    granule: int | None = None,
    param_dtype: str | None = None,
) -> list[Kernel]:
    """The four kernels of one (hidden, dtype, param_dtype) variant; P and the backward's chunk
    granule as `lntune select --parts` chose them for the activations' dtype (the committed
    selection.json) unless given. A mixed variant's forward_stats (no parameters) is the plain one."""
    if parts is None or granule is None:
        selected_parts, selected_granule = database.selected_chunking(target, hidden, dtype)
        parts = selected_parts if parts is None else parts
        granule = selected_granule if granule is None else granule
    return [
        Kernel("forward", hidden, dtype, param_dtype=param_dtype),
        Kernel("forward_stats", hidden, dtype),
        Kernel("backward", hidden, dtype, parts, granule, param_dtype=param_dtype),
        Kernel("backward_sum", hidden, dtype, parts, param_dtype=param_dtype),
    ]


def _check_request(hidden: Iterable[int], dtypes: Iterable[str]) -> tuple[list[int], list[tuple[str, str | None]]]:
    """Sorted distinct hidden sizes and the (dtype, param_dtype) of each dtype spec, in order
    ("bfloat16:float32": bfloat16 activations, float32 parameters; te_ops.parse_dtype_spec)."""
    hidden, dtypes = sorted(set(int(h) for h in hidden)), list(dict.fromkeys(dtypes))
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty list of positive sizes, got {hidden}")
    bad = [d for d in dtypes if not isinstance(d, str) or d.strip() not in DTYPE_SPECS]
    if not dtypes or bad:
        raise ValueError(
            f"dtype must be a non-empty list drawn from {DTYPE_SPECS} (activations:parameters for float32 "
            f"parameters beside 16-bit activations), got {dtypes}"
        )
    return hidden, list(dict.fromkeys(parse_dtype_spec(d) for d in dtypes))


def device_code_kind(target: TargetInfo) -> str:
    if target.family == "cuda":
        return "cubin" if toolchain.cuda_driver_present() else "cuda-source"
    return {"rocm": "hsaco", "cpu": "native"}[target.family]


def export(
    target_name: str,
    hidden: Iterable[int],
    dtypes: Iterable[str],
    out_dir: str | Path,
    logs_dir: Path | None = None,
    log=print,
) -> dict:
    """Compile every requested variant into out_dir/lntune.so and write out_dir/manifest.json."""
    target = get_target(target_name)
    hidden, dtypes = _check_request(hidden, dtypes)
    if target.family == "rocm":
        toolchain.prepare_rocm()
    folder = Path(logs_dir or database.TUNING_LOGS) / target.name
    records, selection = database.read_records(folder), database.read_selection(folder)
    mod, variants, choices = tvm.IRModule(), [], {}
    for n in hidden:
        for dtype, param_dtype in dtypes:
            chunking = database.selected_chunking(target, n, dtype, selection)
            for kernel in kernels_for(n, dtype, target, *chunking, param_dtype=param_dtype):
                # A mixed variant shares its forward_stats with the plain one: built once, listed for both.
                if kernel.name not in choices:
                    choices[kernel.name] = database.choose(kernel, target, records, selection)
                    mod[kernel.name] = database.scheduled(kernel, target, choices[kernel.name].knobs)
                choice = choices[kernel.name]
                variants.append(
                    {
                        "op": kernel.op,
                        "hidden": n,
                        "dtype": dtype,
                        "param_dtype": param_dtype or dtype,
                        "parts": kernel.parts,
                        "granule": kernel.granule,
                        "function": kernel.name,
                        "schedule": choice.source,
                        "knobs": choice.knobs,
                    }
                )
    start = time.perf_counter()
    from lntune import files  # here: the module head is shared

    out = files.output_directory(out_dir)  # before compiling: a bad path costs nothing
    manifest = {
        "lntune_version": __version__,
        "tvm_version": tvm.__version__,
        "target": target.name,
        "target_spec": target.spec,
        "device": target.family,
        "device_code": device_code_kind(target),
        "variants": variants,
    }
    with files.locked(files.lock_path(out), on_wait=lambda lock: log(f"waiting for another export into {out}")):
        _publish_export(mod, target, out, manifest)
    tuned = sum(not v["schedule"].startswith("baseline") for v in variants)
    log(
        f"exported {len(variants)} kernels ({tuned} tuned, selected or transferred, {len(variants) - tuned} baseline) "
        f"for {target.name} to {out / LIBRARY} in {time.perf_counter() - start:.1f}s [{manifest['device_code']}]"
    )
    return manifest


def _publish_export(mod: tvm.IRModule, target: TargetInfo, out: Path, manifest: dict) -> None:
    """Compile `mod` and publish it with `manifest` (plus the library's size and sha256) as the
    folder `out` in one step (lntune.files.staged_directory): killed at any moment, `out` holds the
    previous export whole or the new one whole. Other files in `out` are kept. Hold its lock."""
    from lntune import files

    files.output_directory(out)  # again under the lock: another export may have changed it
    files.clean_staging(out)
    with files.staged_directory(out) as staging:
        compile_module(mod, target).export_library(str(staging / LIBRARY))
        manifest["library_bytes"] = (staging / LIBRARY).stat().st_size
        manifest["library_sha256"] = files.file_digest(staging / LIBRARY)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        files.carry_other_files(out, staging)
