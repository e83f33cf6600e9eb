"""`lntune select`: keep a tuned record only where it wins on the kernel that export really builds.

MetaSchedule measures each candidate with M fixed (static loops, no row predicates); export builds the
same schedule for symbolic M. The two can rank candidates differently, so this times the exported
form of the tuned and the baseline knobs on the device, at M = elements / N, and writes the winner
per kernel to tuning_logs/<target>/selection.json, which `schedules.database.choose` obeys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tvm

from lntune.build import kernels_for
from schedules import database
from schedules.targets import get_target
from te_ops.layer_norm import Kernel

SELECTION = "selection.json"


def device_arguments(kernel: Kernel, rows: int, device, rng: np.random.Generator) -> list:
    """Device tensors for every parameter of the kernel (eps as a float), non-zero random data."""
    func = kernel.prim_func()
    args = []
    for param in func.params:
        if param.name == "eps":
            args.append(1e-5)
            continue
        shape = [rows if isinstance(d, tvm.tirx.Var) else int(d) for d in param.shape]
        data = rng.standard_normal(shape, dtype=np.float32) + (3.0 if param.name == "x" else 0.0)
        if param.name == "rstd":
            data = np.abs(data) + 0.5
        args.append(
            tvm.runtime.tensor(
                data.astype(str(param.dtype))
                if str(param.dtype) != "bfloat16"
                else data.astype(__import__("ml_dtypes").bfloat16),
                device,
            )
        )
    return args


def time_us(kernel: Kernel, target, knobs: dict, args: list, device) -> float:
    func = database.scheduled(kernel, target, knobs)
    lib = tvm.compile(tvm.IRModule({kernel.name: func}), target=tvm.target.Target(target.spec, host="llvm"))
    timer = lib.mod.time_evaluator(kernel.name, device, number=20, repeat=5)
    return float(np.median(timer(*args).results)) * 1e6


def select(target_name: str, hidden: list[int], dtypes: list[str], elements: int = 1 << 26, log=print) -> Path:
    target = get_target(target_name)
    folder = database.TUNING_LOGS / target.name
    path = folder / SELECTION
    selection = json.loads(path.read_text()) if path.exists() else {}
    records = database.read_records(folder)
    device = target.device()
    rng = np.random.default_rng(0)
    for n in hidden:
        for dtype in dtypes:
            for kernel in kernels_for(n, dtype, target):
                choice = database.choose(kernel, target, records, selection={})
                if choice.source == "baseline":
                    continue
                rows = max(1, elements // n)
                args = device_arguments(kernel, rows, device, rng)
                base = database.baseline_knobs(kernel, target)
                t_tuned = time_us(kernel, target, choice.knobs, args, device)
                t_base = time_us(kernel, target, base, args, device)
                winner = "tuned" if t_tuned <= t_base else "baseline"
                selection[kernel.name] = {
                    "choice": winner,
                    "rows": rows,
                    "tuned_us": round(t_tuned, 1),
                    "baseline_us": round(t_base, 1),
                    "record": choice.source,
                }
                log(f"{kernel.name:<44} M={rows:<7} tuned {t_tuned:8.1f} us  baseline {t_base:8.1f} us -> {winner}")
                del args
    path.write_text(json.dumps(selection, indent=1, sort_keys=True) + "\n")
    return path
