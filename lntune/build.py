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
from schedules import database, hooks, pipeline
from schedules.targets import TargetInfo, get_target
from te_ops.layer_norm import DTYPE_SPECS, Kernel, parse_dtype_spec

LIBRARY = "lntune.so"
MANIFEST = "manifest.json"
# Lowers the copies that backward.software_pipeline marks asynchronous to cp.async (the prefetching
# CUDA backward); built without it those copies are plain loads and stores, correct but serial.
PASS_CONFIG = {"tirx.use_async_copy": True}


def compile_module(mod: tvm.IRModule, target: TargetInfo):
    """tvm.compile for `target` with the host as LLVM, lntune's pass configuration and its TIR
    pipeline (TVM's, then the device-kernel rewrites of schedules.pipeline), lntune's hooks in force
    for this build only (schedules.hooks: the pipeline, the CUDA source rewrites, 64-bit cp.async
    offsets, CUDA compiled for the target's architecture where a driver is loaded)."""
    with hooks.installed(target), tvm.transform.PassContext(config=PASS_CONFIG):
        # A CPU library is all host code: built for the target's CPU, not for baseline x86-64.
        tvm_target = tvm.target.Target(target.spec, host=target.spec if target.family == "cpu" else "llvm")
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
    """What the library holds for the device: machine code always (a CUDA library a cubin, with or
    without a driver where it was exported: `export_library`)."""
    return {"cuda": "cubin", "rocm": "hsaco", "cpu": "native"}[target.family]


def export_library(lib, path: str | Path, target: TargetInfo) -> None:
    """`lib.export_library(path)`, a CUDA module in it as a cubin for the target's architecture.

    Where no CUDA driver is loaded TVM leaves a CUDA module holding its source (to be compiled where it
    is loaded, which the runtime-only TVM cannot do). Such a module is compiled here, with the flags
    TVM uses (lntune.toolchain.cuda_binary), and packed into the library in its serialized form
    (format "cubin"): the form a module compiled with a driver present has."""
    if target.family != "cuda":
        lib.export_library(str(path))
        return
    arch = toolchain.cuda_arch(target)
    lib.export_library(
        str(path),
        fpack_imports=lambda mod, system_lib, prefix, workspace: _pack_with_machine_code(
            mod, system_lib, prefix, workspace, arch
        ),
    )


def _pack_with_machine_code(mod, system_lib: bool, prefix: str, workspace: str, arch: str) -> str:
    """fpack_imports for export_library: TVM's blob of the imported modules (ModulePackImportsToLLVM's
    input), every CUDA module of format "cuda" (source) replaced by its cubin, as an object file."""
    import tvm_ffi

    blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy())
    blob = cuda_modules_compiled(blob, lambda source: toolchain.cuda_binary(source, arch))
    llvm_target = mod.get_function("_get_target_string")()
    obj = tvm_ffi.get_global_func("codegen.codegen_blob")(blob, system_lib, llvm_target, prefix)
    path = str(Path(workspace) / f"{prefix}devc.o")
    obj.write_to_file(path)
    return path


def cuda_modules_compiled(blob: bytes, compile_source) -> bytes:
    """A library blob (`__tvm_ffi__library_bin`: u64 size, the import tree as two u64 vectors, then
    per module its kind and, but for the host library "_lib", its bytes) with each CUDA module's
    bytes (format, function table, code) rewritten: code in format "cuda" -> compile_source(code), of
    format "cubin". Other modules and CUDA modules of other formats are copied as they are."""
    view = _Reader(blob)
    total = view.u64()
    if total != len(blob) - 8:
        raise ValueError(f"library blob: header says {total} bytes, {len(blob) - 8} follow")
    indptr = view.u64s()
    view.u64s()  # the child indices
    out = [blob[8 : view.at]]
    for _ in range(len(indptr) - 1):
        kind = view.string()
        out.append(_string(kind))
        if kind == b"_lib":
            continue
        payload = view.string()
        if kind == b"cuda":
            payload = _compiled_cuda_module(payload, compile_source)
        out.append(_string(payload))
    if view.at != len(blob):
        raise ValueError(f"library blob: {len(blob) - view.at} bytes left over after its modules")
    body = b"".join(out)
    return len(body).to_bytes(8, "little") + body


def _compiled_cuda_module(payload: bytes, compile_source) -> bytes:
    """A CUDA module's bytes (format, function table, code) with source compiled (see above). The
    function table is copied whole: the code is the last field, so it lies between the two."""
    view = _Reader(payload)
    if view.string() != b"cuda":
        return payload
    code_at = _last_string_at(payload)
    table = payload[view.at : code_at]
    code = _Reader(payload, code_at).string()
    compiled = compile_source(code.decode())
    return _string(b"cubin") + table + _string(compiled)


def _last_string_at(payload: bytes) -> int:
    """Where the last field (u64 length + bytes, running to the end) of a module's bytes starts: the
    last place whose u64 is the length of what follows it (inside CUDA source, 8 bytes of text read
    as a u64 are far beyond any length)."""
    for at in range(len(payload) - 8, -1, -1):
        if int.from_bytes(payload[at : at + 8], "little") == len(payload) - at - 8:
            return at
    raise ValueError("CUDA module bytes: no code field at their end")


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


class _Reader:
    def __init__(self, data: bytes, at: int = 0) -> None:
        self.data, self.at = data, at

    def u64(self) -> int:
        if self.at + 8 > len(self.data):
            raise ValueError("library blob: truncated")
        value = int.from_bytes(self.data[self.at : self.at + 8], "little")
        self.at += 8
        return value

    def u64s(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def string(self) -> bytes:
        n = self.u64()
        if self.at + n > len(self.data):
            raise ValueError("library blob: truncated")
        value = self.data[self.at : self.at + n]
        self.at += n
        return value


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
        export_library(compile_module(mod, target), staging / LIBRARY, target)
        manifest["library_bytes"] = (staging / LIBRARY).stat().st_size
        manifest["library_sha256"] = files.file_digest(staging / LIBRARY)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        files.carry_other_files(out, staging)
