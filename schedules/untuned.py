"""The rule for hidden sizes nobody tuned: the knobs of the nearest tuned N, scaled, and a fitted P.

`lntune select` ruled on a few hidden sizes per dtype (selection.json). Across them the winners
keep a thread's share of the row nearly constant (16-bit: 8 elements a thread, one 16-byte vector,
from N = 2048 to 16384, the 16384 rows split over a 2-block cluster; float32: 12 to 16) while
threads, rows per step, staging, prefetching and occupancy requests are a matter of structure that
neighbouring N share. P, the backward's row chunks, falls with N instead: for 16-bit P·N stays
near 2^20 elements, for float32 P falls more slowly (docs/performance.md, sections 3 and 12).

So an untuned N of a dtype takes, op by op, the choice of the nearest tuned N of the same dtype
(by |log N ratio|, the smaller N on a tie), with the thread count re-chosen among the new N's
candidates so that each thread holds as many elements as at the source, and the cluster split
kept (or the source refused where N cannot split). The P of the backward and its sum is fitted
over the three tuned N of the dtype nearest N: least squares of log P (in blocks) on log N, rounded
to the nearest of `rules.parts_candidates`; the granule is the source's. A scaled backward must fit the design
space, the register file (`estimates.registers_needed` a thread times the block's threads, and
times the resident threads it asks ptxas for) and the dynamic shared memory
(`estimates.shared_bytes_needed`); if not, the next-nearest tuned N is tried, and with none left the
kernel takes the baseline.

Left-one-out over the committed selection (each tuned N held out, the rule applied from the others,
its pick looked up in the held-out N's recorded timings): P within 2.7 % of the best P everywhere
it was timed; the backward's knobs within 5 % at 5 of the 8 held-out kernels whose timings include
the pick, 6-12 % at 3; most of the held-out grids (re-timed with --focus or --parts) lack the pick.
The longest tuned N (16384) is not predicted from the shorter ones: at one block a row a thread
would hold twice the elements, past the register file, so it falls back to the baseline.

The manifest names it: `rule:nearest-n<source N>:<the source kernel's own schedule>`, or
`baseline (rule: ...)` where the source's own choice is the baseline or nothing fits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from schedules import backward, estimates, layout, rules
from schedules.targets import TargetInfo
from te_ops.layer_norm import GRANULES, ROW_GRANULE, Kernel

NAME = "nearest"
REGISTERS_PER_THREAD = 255  # what ptxas can give one thread
_KERNEL_NAME = re.compile(r"^lntune_(backward)_([a-z0-9]+)_n(\d+)_p(\d+)(?:g(\d+))?$")


@dataclass(frozen=True)
class Source:
    """Where an untuned (N, dtype) takes its knobs from: the tuned N, and its backward's chunking
    and knobs as scaled to N (the partials sum and the forward ops follow the same source)."""

    hidden: int
    parts: int
    granule: int
    tuned_backward: dict  # the source N's own backward knobs, as it exports them
    backward: dict  # ... scaled to the untuned N at (parts, granule)
    tried: tuple[int, ...]


def own_chunking(target: TargetInfo, hidden: int, dtype: str, selection: dict) -> tuple[int, int] | None:
    """(P, granule) that `lntune select --parts` recorded for (N, dtype), else None."""
    entry = selection.get(f"parts:{dtype}:n{hidden}", {})
    parts, granule = entry.get("parts"), entry.get("granule", ROW_GRANULE)
    if not isinstance(parts, int) or parts < 1:
        return None
    return parts, granule if granule in GRANULES else ROW_GRANULE


def chunking_of_tuned(target: TargetInfo, hidden: int, dtype: str, selection: dict) -> tuple[int, int]:
    """The chunking a tuned N exports with: its recorded one, else the rule of rules.parts_for."""
    return own_chunking(target, hidden, dtype, selection) or (rules.parts_for(target, hidden, dtype), ROW_GRANULE)


def tuned_hiddens(target: TargetInfo, dtype: str, selection: dict) -> list[int]:
    """The N of `dtype` that select ruled on: a backward verdict at the N's exported chunking."""
    found = set()
    for name in selection:
        match = _KERNEL_NAME.match(name)
        if not match or match.group(2) != dtype:
            continue
        hidden = int(match.group(3))
        parts, granule = chunking_of_tuned(target, hidden, dtype, selection)
        if Kernel("backward", hidden, dtype, parts, granule).name == name:
            found.add(hidden)
    return sorted(found)


def applies(target: TargetInfo, hidden: int, dtype: str, selection: dict) -> bool:
    """The rule is for GPUs, and for N that were not tuned but beside some that were."""
    if not target.is_gpu or target.family != "cuda":
        return False
    tuned = tuned_hiddens(target, dtype, selection)
    return bool(tuned) and hidden not in tuned


def nearest_first(hidden: int, tuned: list[int]) -> list[int]:
    """Tuned N by distance in log N from `hidden`, the smaller first on a tie."""
    return sorted(tuned, key=lambda n: (abs(math.log2(n / hidden)), n))


def _split_of(target: TargetInfo, hidden: int, dtype: str, selection: dict) -> int:
    """The cluster split of a tuned N's backward, as its verdict records it (1: none)."""
    parts, granule = chunking_of_tuned(target, hidden, dtype, selection)
    knobs = selection.get(Kernel("backward", hidden, dtype, parts, granule).name, {}).get("knobs") or {}
    return knobs.get("cluster") or 1


FIT_POINTS = 3  # tuned N the P fit takes, nearest first (left-one-out: all seven N gave more misses)


def fitted_blocks(target: TargetInfo, hidden: int, dtype: str, selection: dict, tuned: list[int]) -> int:
    """Thread blocks of row chunks (P times the cluster's blocks) for `hidden`: least squares of
    log2(blocks) on log2(N) over the FIT_POINTS nearest tuned N, rounded in log to the nearest P
    candidate (a tie to more blocks). Local, because P is capped at 8 waves: the short rows sit at
    the cap and would flatten a fit over all N."""
    points = []
    for n in nearest_first(hidden, tuned)[:FIT_POINTS]:
        parts, _ = chunking_of_tuned(target, n, dtype, selection)
        points.append((math.log2(n), math.log2(parts * _split_of(target, n, dtype, selection))))
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    wanted = mean_y + slope * (math.log2(hidden) - mean_x)
    return min(rules.parts_candidates(target), key=lambda b: (abs(math.log2(b) - wanted), -b))


def _thread_count(kernel: Kernel, target: TargetInfo, candidates: list[int], per_thread: float) -> int:
    """The candidate whose elements a thread is nearest `per_thread` (in log; more threads on a tie)."""
    return min(candidates, key=lambda t: (abs(math.log2(kernel.hidden / t / per_thread)), -t))


def fits_budget(kernel: Kernel, target: TargetInfo, knobs: dict) -> bool:
    """A backward's knobs within the register file and dynamic shared memory (the design space's
    own estimates): a block's threads at their estimated registers fit one SM, and so do the
    resident threads it asks ptxas for."""
    need = estimates.registers_needed(kernel, knobs)
    if need > REGISTERS_PER_THREAD or need * knobs["threads"] > estimates.REGISTERS_PER_SM:
        return False
    if knobs.get("threads_per_sm") and need * knobs["threads_per_sm"] > estimates.REGISTERS_PER_SM:
        return False
    return estimates.shared_bytes_needed(kernel, knobs) <= target.dynamic_shared_bytes


def scale_backward(kernel: Kernel, target: TargetInfo, knobs: dict, source_hidden: int, exact) -> dict | None:
    """A tuned backward's knobs at `source_hidden` carried to `kernel` (its N, P and granule), or None.

    The cluster split is kept (None where `kernel` cannot split); the thread count is re-chosen so a
    thread holds as many elements of its block's columns as at the source; an occupancy request
    that no longer fits the threads is dropped. `exact(kernel, knobs)`: database.exact_knobs."""
    split = knobs.get("cluster") or 0
    if split and not backward.clusterable(kernel, target):
        return None
    block = layout.block_kernel(kernel, split)
    per_thread = source_hidden / (split or 1) / knobs["threads"]
    candidates = layout.thread_candidates(block, target, max_per_thread=32 if knobs["cache_rows"] else 64)
    scaled = {**knobs, "threads": _thread_count(block, target, candidates, per_thread)}
    if scaled.get("threads_per_sm") and scaled["threads_per_sm"] < scaled["threads"]:
        scaled["threads_per_sm"] = 0
    if scaled["rows_per_step"] not in backward.steps_for(kernel):
        return None
    if not fits_budget(kernel, target, scaled):
        return None
    return exact(kernel, scaled)


def scale_rowwise(kernel: Kernel, target: TargetInfo, knobs: dict, source_hidden: int, exact) -> dict | None:
    """A tuned forward (or forward_stats) carried to `kernel`'s N: as many elements a thread, the
    rows a block kept while the block stays within the target's threads."""
    candidates = layout.thread_candidates(kernel, target)
    threads = _thread_count(kernel, target, candidates, source_hidden / knobs["threads"])
    rows = knobs.get("rows_per_block", 1)
    while rows > 1 and threads * rows > target.max_threads:
        rows //= 2
    return exact(kernel, {**knobs, "threads": threads, "rows_per_block": rows})


def find_source(target: TargetInfo, hidden: int, dtype: str, selection: dict, choose_tuned, exact) -> Source | None:
    """The tuned N an untuned (N, dtype) takes its knobs from, nearest first, with its backward
    scaled; None when no tuned N's backward fits (the baseline then). `choose_tuned(kernel)`: the
    choice export makes for a kernel of a tuned N."""
    tuned = tuned_hiddens(target, dtype, selection)
    if not tuned or hidden in tuned:
        return None
    cache: dict[int, dict] = {}

    def knobs_of(n: int) -> dict:
        if n not in cache:
            parts, granule = chunking_of_tuned(target, n, dtype, selection)
            cache[n] = choose_tuned(Kernel("backward", n, dtype, parts, granule)).knobs
        return cache[n]

    blocks = fitted_blocks(target, hidden, dtype, selection, tuned)
    tried = []
    for n in nearest_first(hidden, tuned):
        tried.append(n)
        knobs = knobs_of(n)
        _, granule = chunking_of_tuned(target, n, dtype, selection)
        parts = max(1, blocks // (knobs.get("cluster") or 1))
        kernel = Kernel("backward", hidden, dtype, parts, granule)
        scaled = scale_backward(kernel, target, knobs, n, exact)
        if scaled is not None:
            return Source(n, parts, granule, knobs, scaled, tuple(tried))
    return None


def label(source: Source, source_schedule: str) -> str:
    """The manifest's schedule of a kernel the rule scaled: the source N, and how the source's own
    kernel was chosen (its label, without timings measured at the source N)."""
    return f"rule:{NAME}-n{source.hidden}:{source_schedule.split(' (')[0]}"


def scale(kernel: Kernel, target: TargetInfo, source: Source, source_choice, exact) -> dict | None:
    """The knobs of `kernel` (an op of the untuned N) from the source N's choice for the same op."""
    if kernel.op == "backward":
        return scale_backward(kernel, target, source.tuned_backward, source.hidden, exact)
    if kernel.op == "backward_sum":
        return exact(kernel, source_choice.knobs)
    return scale_rowwise(kernel, target, source_choice.knobs, source.hidden, exact)
