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
from schedules import database
from schedules.targets import TargetInfo, get_target
from te_ops.layer_norm import DTYPES, Kernel

LIBRARY = "lntune.so"
MANIFEST = "manifest.json"


def kernels_for(hidden: int, dtype: str, target: TargetInfo, parts: int | None = None) -> list[Kernel]:
    """The four kernels of one (hidden, dtype) variant; P as `lntune select --parts` chose it (the
    committed selection.json) unless given."""
    if parts is None:
        parts = database.selected_parts(target, hidden, dtype)
    return [
        Kernel("forward", hidden, dtype),
        Kernel("forward_stats", hidden, dtype),
        Kernel("backward", hidden, dtype, parts),
        Kernel("backward_sum", hidden, dtype, parts),
    ]


def _check_request(hidden: Iterable[int], dtypes: Iterable[str]) -> tuple[list[int], list[str]]:
    hidden, dtypes = sorted(set(int(h) for h in hidden)), list(dict.fromkeys(dtypes))
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty list of positive sizes, got {hidden}")
    bad = [d for d in dtypes if d not in DTYPES]
    if not dtypes or bad:
        raise ValueError(f"dtype must be a non-empty list drawn from {DTYPES}, got {dtypes}")
    return hidden, dtypes


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
    mod, variants = tvm.IRModule(), []
    for n in hidden:
        for dtype in dtypes:
            for kernel in kernels_for(n, dtype, target, database.selected_parts(target, n, dtype, selection)):
                choice = database.choose(kernel, target, records, selection)
                mod[kernel.name] = database.scheduled(kernel, target, choice.knobs)
                variants.append(
                    {
                        "op": kernel.op,
                        "hidden": n,
                        "dtype": dtype,
                        "parts": kernel.parts,
                        "function": kernel.name,
                        "schedule": choice.source,
                        "knobs": choice.knobs,
                    }
                )
    start = time.perf_counter()
    lib = tvm.compile(mod, target=tvm.target.Target(target.spec, host="llvm"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out / LIBRARY))
    manifest = {
        "lntune_version": __version__,
        "tvm_version": tvm.__version__,
        "target": target.name,
        "target_spec": target.spec,
        "device": target.family,
        "device_code": device_code_kind(target),
        "variants": variants,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    tuned = sum(not v["schedule"].startswith("baseline") for v in variants)
    log(
        f"exported {len(variants)} kernels ({tuned} tuned, selected or transferred, {len(variants) - tuned} baseline) "
        f"for {target.name} to {out / LIBRARY} in {time.perf_counter() - start:.1f}s [{manifest['device_code']}]"
    )
    return manifest
