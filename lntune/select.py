"""`lntune select`: time each kernel's candidate knobs as export builds them and keep the fastest.

MetaSchedule measures each candidate with M fixed (static loops, no row predicates); export builds the
same schedule for symbolic M. The two can rank candidates differently, and the tuning spaces leave
some structure out (rows per step, who unrolls), so this times, on the device and at M = elements / N,
the exported form of the baseline, the tuned record and (backward on CUDA) a few structural
variants around them (schedules.variants.variants). A CUDA candidate whose ptxas report shows a
stack frame past STACK_LIMIT is left out. Every candidate is first run on poisoned outputs and
compared with the baseline's results (today's choice's, where the baseline does not build).
Candidates within TIE of the fastest are timed again at SMALL_ROWS rows, where the fastest of them
wins. A partials sum is timed right after today's backward, as the pair runs (its time is the
pair's less the backward's). The winner per kernel goes to
tuning_logs/<target>/selection.json, which `schedules.database.choose` obeys.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import tvm

from lntune.build import kernel_library, kernels_for
from lntune.inspect import stack_frame_bytes
from lntune.timing import host_array, median_us, queued_us, relative_distance, run_once
from schedules import database, rules, variants
from schedules.backward import steps_for
from schedules.targets import TargetInfo, get_target
from te_ops.layer_norm import GRANULES, OPS, ROW_GRANULE, Kernel

SELECTION = "selection.json"
# Relative-norm distance from the reference's outputs that a candidate may have (summation order only).
AGREEMENT = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# Bytes a thread of stack frame (local memory: a row cache ptxas could not keep in registers) past
# which a CUDA candidate is left out. The driver reserves the frame for every thread that can be
# resident: 512 bytes is 138 MB on an H100, and two winners of 8 and 20 KB (docs/performance.md,
# section 4) would have reserved gigabytes, a cost the timing does not see. Spills of a few registers stay below.
STACK_LIMIT = 512


def device_arguments(kernel: Kernel, rows: int, device, rng: np.random.Generator) -> list:
    """Device tensors for every parameter of the kernel (eps as a float), non-zero random data."""
    args = []
    for param in kernel.prim_func().params:
        if param.name == "eps":
            args.append(1e-5)
            continue
        shape = [rows if isinstance(d, tvm.tirx.Var) else int(d) for d in param.shape]
        data = rng.standard_normal(shape, dtype=np.float32) + (3.0 if param.name == "x" else 0.0)
        if param.name == "rstd":
            data = np.abs(data) + 0.5
        args.append(tvm.runtime.tensor(host_array(shape, str(param.dtype), data), device))
    return args


def output_names(kernel: Kernel) -> list[str]:
    """The parameters the kernel writes (its TE compute tensors; eps is a scalar Var)."""
    return [t.op.name for t in kernel.tensors() if isinstance(getattr(t, "op", None), tvm.te.ComputeOp)]


def output_positions(kernel: Kernel) -> list[int]:
    """Where the kernel's outputs (output_names, in that order) are among its parameters."""
    names = [p.name for p in kernel.prim_func().params]
    return [names.index(name) for name in output_names(kernel)]


def time_us(kernel: Kernel, target: TargetInfo, knobs: dict, args: list, device) -> float:
    """Median microseconds of the exported kernel with these knobs (compiled here)."""
    return median_us(kernel_library(kernel, target, knobs).mod, kernel.name, args, device)


def candidates(
    kernel: Kernel, target: TargetInfo, records: dict, focus: str | None = None, selected: dict | None = None
) -> tuple[dict[str, dict], str]:
    """label -> knobs to time (baseline, tuned, variant<i>), and where the tuned knobs came from.

    With `focus` (a knob name or name=value, or several joined by commas), only the baseline, the
    `selected` knobs and the candidates that set every such knob (to that value), plus with values
    the `selected` knobs set to them: a new knob is measured against today's choice without
    re-timing every variant.
    """
    found = {"baseline": database.baseline_knobs(kernel, target)}
    choice = database.choose(kernel, target, records, selection={})
    if not choice.source.startswith("baseline"):
        found["tuned"] = choice.knobs
    for index, knobs in enumerate(variants.variants(kernel, target, found.get("tuned", found["baseline"]))):
        if knobs not in found.values():
            found[f"variant{index}"] = knobs
    if focus:
        wanted = {name: value for name, _, value in (part.partition("=") for part in focus.split(","))}

        def focused(knobs: dict) -> bool:
            return all(knobs.get(n) == int(v) if v else bool(knobs.get(n)) for n, v in wanted.items())

        found = {
            label: knobs for label, knobs in found.items() if label == "baseline" or knobs == selected or focused(knobs)
        }
        # Today's choice is always timed beside them, so the verdict can keep it.
        if selected and selected not in found.values():
            found["selected"] = selected
        # Today's choice with the focused values, when the variants (built around the tuned record)
        # lack it and the values are ones its space offers.
        values = {n: int(v) for n, v in wanted.items() if v}
        moved = database.exact_knobs(kernel, target, {**selected, **values}) if values and selected else None
        if moved and moved not in found.values():
            found["selected+" + focus] = moved
    return found, choice.source


def _build(job: tuple[Kernel, str, dict, str]) -> tuple[str, str]:
    """Export one candidate to its own shared library (run in a worker); (path, "") or ("", why not)."""
    kernel, target_name, knobs, path = job
    target = get_target(target_name)
    try:
        lib = kernel_library(kernel, target, knobs)
        lib.export_library(path)
        if target.family == "cuda":
            # From the cubin the library embeds where one was built (a GPU host), else ptxas on the source.
            frame = stack_frame_bytes(lib, target.spec.get("arch", "sm_90"), Path(path).read_bytes())
            if frame is not None and frame > STACK_LIMIT:
                os.remove(path)
                return "", f"{frame}-byte stack frame a thread (local memory), over STACK_LIMIT = {STACK_LIMIT}"
    except Exception as err:  # noqa: BLE001 (a candidate that does not build is left out, with the reason)
        return "", (str(err).strip().splitlines() or ["?"])[-1][:200]
    return path, ""


def _build_all(target: TargetInfo, plan: dict[Kernel, dict[str, dict]], folder: str, log) -> dict:
    """(kernel, label) -> library path, built in parallel (nvcc per candidate dominates)."""
    jobs = {
        (kernel, label): (kernel, target.name, knobs, os.path.join(folder, f"{kernel.name}-{label}.so"))
        for kernel, labelled in plan.items()
        for label, knobs in labelled.items()
    }
    # spawn: the workers must not inherit this process's TVM/CUDA state. One worker per core this
    # process may run on, so select jobs pinned to disjoint cores (bench/parallel_select.sh) share a host.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(os.sched_getaffinity(0)), mp_context=context) as pool:
        results = dict(zip(jobs, pool.map(_build, jobs.values()), strict=True))
    built = {}
    for (kernel, label), (path, error) in results.items():
        if path:
            built[kernel, label] = path
        else:
            log(f"{kernel.name} {label}: build failed, left out: {error}")
    return built


def _after_backward(
    sum_kernel: Kernel, sum_args: list, backward_path: str, rows: int, device, rng
) -> tuple[list, Callable[[], object]]:
    """`sum_args` with the partials the backward writes in place of the sum's own, and a call of
    the backward (on its own fresh arguments)."""
    backward = _followed(sum_kernel)
    backward_args = device_arguments(backward, rows, device, rng)
    by_name = dict(zip((p.name for p in backward.prim_func().params), backward_args, strict=True))
    names = [p.name for p in sum_kernel.prim_func().params]
    pair_args = [by_name[name] if name.endswith("_part") else arg for name, arg in zip(names, sum_args, strict=True)]
    function = tvm.runtime.load_module(backward_path)[backward.name]
    return pair_args, lambda: function(*backward_args)


def _measure(
    kernel: Kernel, paths: dict[str, str], rows: int, device, rng, log, backward_path: str = ""
) -> dict[str, float]:
    """label -> median us of every candidate that agrees with the first one (the reference).

    With `backward_path` (a partials sum's), each candidate is timed right after that backward, on
    the partials it just wrote, as the two run in lntune; the time is the pair's less the
    backward's alone. Timed alone, a sum reads partials that earlier calls left in L2 and skips the
    launch behind a kernel, so alone and in the pair rank splits differently (docs/performance.md,
    section 3)."""
    args = device_arguments(kernel, rows, device, rng)
    outputs = output_positions(kernel)
    reference, times = None, {}
    if backward_path:
        pair_args, backward = _after_backward(kernel, args, backward_path, rows, device, rng)
        alone = queued_us([backward], device)
    for label, path in paths.items():
        module = tvm.runtime.load_module(path)
        try:
            results = run_once(module, kernel.name, args, outputs)
        except Exception as err:  # noqa: BLE001 (a launch the device refuses, e.g. too much shared memory)
            if reference is None:
                raise
            log(f"{kernel.name} {label}: left out, it did not run: {str(err).strip().splitlines()[-1][:200]}")
            continue
        if reference is None:
            reference = results
        distance = max(relative_distance(g, w) for g, w in zip(results, reference, strict=True))
        if not distance <= AGREEMENT[kernel.dtype]:
            log(f"{kernel.name} {label}: left out, outputs differ from the reference's by {distance:.2e}")
            continue
        if backward_path:
            function = module[kernel.name]
            times[label] = queued_us([backward, lambda f=function: f(*pair_args)], device) - alone
        else:
            times[label] = median_us(module, kernel.name, args, device)
    return times


@dataclass
class Timed:
    """One kernel's candidates as timed: label -> median us at `rows` rows, and the tied ones
    (see TIE) again at `small_rows` (0: not re-timed)."""

    kernel: Kernel
    rows: int
    us: dict[str, float]
    small_rows: int = 0
    small_us: dict[str, float] = field(default_factory=dict)


FOLLOWED = "followed"  # the label of a backward built only for the sums timed after it


def _followed(sum_kernel: Kernel) -> Kernel:
    return Kernel("backward", sum_kernel.hidden, sum_kernel.dtype, sum_kernel.parts)


def _backwards_followed(
    target: TargetInfo, plan: dict[Kernel, dict[str, dict]], built: dict, folder: str, log
) -> dict[Kernel, str]:
    """backward -> library of the backward each partials sum of `plan` is timed after: the knobs
    `plan` times as "today" (select --parts, at each P), else today's choice. A library the plan
    already built with those knobs is used as it is; the others are built here."""
    paths, missing = {}, {}
    for backward in {_followed(k) for k in plan if k.op == "backward_sum"}:
        candidates = plan.get(backward, {})
        knobs = candidates.get("today") or database.choose(backward, target).knobs
        same = [label for label, k in candidates.items() if k == knobs and (backward, label) in built]
        if same:
            paths[backward] = built[backward, same[0]]
        else:
            missing[backward] = {FOLLOWED: knobs}
    if missing:
        paths |= {kernel: path for (kernel, _), path in _build_all(target, missing, folder, log).items()}
    return paths


def time_plan(
    target: TargetInfo,
    plan: dict[Kernel, dict[str, dict]],
    elements: int = 1 << 26,
    log=print,
    small_rows: int = 0,
) -> Iterator[Timed]:
    """Build every candidate of `plan` (kernel -> label -> knobs) in parallel, then time each kernel's
    at M = elements / N rows, and with `small_rows` those within TIE of the fastest again at that M.
    The first label of a kernel that built is the reference the others must agree with (select
    puts the baseline first and today's choice second: a baseline with a stack frame over
    STACK_LIMIT is correct, but is left out like any other candidate)."""
    device, rng = target.device(), np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="lntune-select-") as scratch:
        built = _build_all(target, plan, scratch, log)
        followed = _backwards_followed(target, plan, built, scratch, log)
        for kernel, labelled in plan.items():
            paths = {label: built[kernel, label] for label in labelled if (kernel, label) in built}
            if not paths:
                log(f"{kernel.name}: no candidate built; not timed")
                continue
            first = next(iter(labelled))
            if first not in paths:
                log(f"{kernel.name}: {first} did not build; {next(iter(paths))} is the reference")
            rows = max(1, elements // kernel.hidden)
            backward_path = followed.get(_followed(kernel), "") if kernel.op == "backward_sum" else ""
            timed = Timed(kernel, rows, _measure(kernel, paths, rows, device, rng, log, backward_path))
            close = tied(timed.us)
            # A sum's time does not depend on M (it reads P rows); after a backward of 1024 rows
            # the host's launches, not the device, would set it.
            if small_rows and len(close) > 1 and not backward_path:
                timed.small_rows = small_rows
                timed.small_us = _measure(
                    kernel, {label: paths[label] for label in close}, small_rows, device, rng, log
                )
            yield timed


def select(
    target_name: str,
    hidden: list[int],
    dtypes: list[str],
    elements: int = 1 << 26,
    ops: list[str] | None = None,
    focus: str | None = None,
    log=print,
) -> Path:
    """Time the candidates of every kernel (of `ops`, default all) with more than one; update selection.json.

    `focus`: see `candidates`; the verdict then comes from this run's timings of those candidates.
    """
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"ops: expected some of {', '.join(OPS)}, got {', '.join(unknown)}")
    target = get_target(target_name)
    folder = database.TUNING_LOGS / target.name
    path = folder / SELECTION
    selection = database.read_selection(folder)
    records = database.read_records(folder)
    plan, sources, previous = {}, {}, {}
    for n in hidden:
        for dtype in dtypes:
            chunking = database.selected_chunking(target, n, dtype, selection)
            for kernel in kernels_for(n, dtype, target, *chunking):
                if ops and kernel.op not in ops:
                    continue
                selected = database.choose(kernel, target, records, selection).knobs
                labelled, sources[kernel] = candidates(kernel, target, records, focus, selected if focus else None)
                if len(labelled) > 1:
                    previous[kernel] = next((label for label, knobs in labelled.items() if knobs == selected), None)
                    # Today's choice second: the reference when the baseline does not build (time_plan).
                    order = ["baseline", previous[kernel]]
                    plan[kernel] = {k: labelled[k] for k in order if k in labelled} | labelled
    for timed in time_plan(target, plan, elements, log, small_rows=SMALL_ROWS):
        kernel, times = timed.kernel, timed.us
        selection[kernel.name] = best = verdict(plan[kernel], timed, sources[kernel])
        small = f", {len(timed.small_us)} again at M={timed.small_rows}" if timed.small_us else ""
        before = previous[kernel]
        before = f"  previous {before} {times[before]:8.1f} us" if before in times else "  previous not timed"
        baseline = f"{times['baseline']:8.1f} us" if "baseline" in times else "not built"
        log(
            f"{kernel.name:<44} M={timed.rows:<7} baseline {baseline}{before}  "
            f"-> {best['label']} {times[best['label']]:8.1f} us  ({len(times)} timed{small})"
        )
        path.write_text(json.dumps(selection, indent=1, sort_keys=True) + "\n")  # kept if a later one fails
    return path


def select_parts(target_name: str, hidden: list[int], dtypes: list[str], elements: int = 1 << 26, log=print) -> Path:
    """Choose P and the backward's chunk granule per (N, dtype): time the backward and its partials
    sum at every rules.parts_candidates P (counted in blocks of a cluster kernel's chunk) with
    today's knobs, the backward at each granule those knobs allow (chunks of single rows need one
    row a step), keep the least total in selection.json (read by build.kernels_for), and give the
    kernels chosen verdicts with the knobs timed."""
    target = get_target(target_name)
    folder = database.TUNING_LOGS / target.name
    path = folder / SELECTION
    selection, records = database.read_selection(folder), database.read_records(folder)
    plan, sources = {}, {}
    for n in hidden:
        for dtype in dtypes:
            chunking = database.selected_chunking(target, n, dtype, selection)
            backward = [k for k in kernels_for(n, dtype, target, *chunking) if k.op.startswith("backward")]
            choices = {k: database.choose(k, target, records, selection) for k in backward}
            blocks = max(choice.knobs.get("cluster", 0) or 1 for choice in choices.values())
            for kernel, choice in choices.items():
                for parts in rules.parts_candidates(target, blocks):
                    for granule in _granules(kernel, choice.knobs):
                        moved = replace(kernel, parts=parts, granule=granule)
                        plan[moved], sources[moved] = {"today": choice.knobs}, choice.source
    timed: dict[tuple[int, str], dict[tuple[int, int], dict[str, float]]] = {}
    sums: dict[tuple[int, str], dict[int, float]] = {}
    rows_of = {}
    for result in time_plan(target, plan, elements, log):
        kernel = result.kernel
        if "today" in result.us:
            rows_of[kernel.hidden] = result.rows
            if kernel.op == "backward":
                timed.setdefault((kernel.hidden, kernel.dtype), {})[kernel.parts, kernel.granule] = result.us["today"]
            else:
                sums.setdefault((kernel.hidden, kernel.dtype), {})[kernel.parts] = result.us["today"]
    for (n, dtype), by_chunking in timed.items():
        summed = sums.get((n, dtype), {})
        totals = {pg: us + summed[pg[0]] for pg, us in by_chunking.items() if pg[0] in summed}
        if not totals:
            log(f"{dtype} N={n}: no P had both kernels run; P left as it was")
            continue
        best, granule = min(totals, key=totals.get)
        us = {_chunking_label(*pg): round(t, 1) for pg, t in sorted(totals.items(), key=lambda item: item[1])}
        selection[database.parts_key(n, dtype)] = {"parts": best, "granule": granule, "rows": rows_of[n], "us": us}
        for kernel, op_us in (
            (Kernel("backward", n, dtype, best, granule), by_chunking[best, granule]),
            (Kernel("backward_sum", n, dtype, best), summed[best]),
        ):
            if selection.get(kernel.name, {}).get("knobs") == plan[kernel]["today"]:
                continue  # chunking unchanged: the verdict that chose these knobs, with all its timings, stays
            selection[kernel.name] = {
                "choice": "variant",
                "label": "today",
                "knobs": plan[kernel]["today"],
                "rows": rows_of[n],
                "us": {"today": round(op_us, 1)},
                "record": f"select --parts: {sources[kernel]}",
            }
        chosen = _chunking_label(best, granule)
        log(f"{dtype:<9} N={n:<6} P={chosen:<7} backward + sum {totals[best, granule]:8.1f} us  (every P: {us})")
        path.write_text(json.dumps(selection, indent=1, sort_keys=True) + "\n")
    return path


def _granules(kernel: Kernel, knobs: dict) -> tuple[int, ...]:
    """The chunk granules select --parts times a kernel at: a backward's that its knobs' rows per
    step allow (the partials sum has no chunks)."""
    if kernel.op != "backward":
        return (ROW_GRANULE,)
    return tuple(g for g in GRANULES if knobs.get("rows_per_step", 1) in steps_for(replace(kernel, granule=g)))


def _chunking_label(parts: int, granule: int) -> str:
    """P, and the granule when it is not te_ops' default: "66", "66g1"."""
    return f"{parts}" if granule == ROW_GRANULE else f"{parts}g{granule}"


def parse_chunking(label: str) -> tuple[int, int]:
    """(P, granule) of a chunking label ("66", "66g1"), as select --parts writes them."""
    parts, _, granule = label.partition("g")
    return int(parts), int(granule) if granule else ROW_GRANULE


# Candidates this close to the fastest count as tied, and are timed again at SMALL_ROWS rows (the
# smallest M the issue asks about), where the fastest of them wins. Timed at one M (about 2**26
# elements), a block of 128 threads won bfloat16 N = 4096 by 1 % and was then 0.72x ATen at
# M = 1024, where 512 threads had been 1.32x: with P fixed, the threads of a block are all the
# parallelism a small M has (docs/performance.md, section 1). Without small-M timings the most
# threads win a tie.
TIE = 0.02
SMALL_ROWS = 1024


def tied(times: dict[str, float]) -> list[str]:
    """The labels timed within TIE of the fastest, fastest first."""
    fastest = min(times.values(), default=0.0)
    return sorted((label for label in times if times[label] <= fastest * (1 + TIE)), key=times.get)


def _small_m_winner(close: list[str], timed: Timed) -> str:
    """Of the tied labels, the fastest at small M (within TIE there, the faster at the large M)."""
    small = {label: timed.small_us[label] for label in close if label in timed.small_us}
    best = min(small.values())
    return min((label for label in small if small[label] <= best * (1 + TIE)), key=timed.us.get)


def verdict(labelled: dict[str, dict], timed: Timed, record: str) -> dict:
    """The selection.json entry of one kernel: the fastest candidate (ties: see TIE), its knobs and
    every timing."""
    close = tied(timed.us)
    if any(label in timed.small_us for label in close):
        label = _small_m_winner(close, timed)
    else:
        label = max(close, key=lambda name: (labelled[name].get("threads", 0), -timed.us[name]))
    choice = label if label in ("baseline", "tuned") else "variant"
    entry = {
        "choice": choice,
        "label": label,
        "knobs": labelled[label],
        "rows": timed.rows,
        "us": {name: round(us, 1) for name, us in sorted(timed.us.items(), key=lambda item: item[1])},
        "record": record,
    }
    if timed.small_us:
        entry["small"] = {"rows": timed.small_rows, "us": {n: round(us, 2) for n, us in timed.small_us.items()}}
    return entry
