"""Rows per step 1/2/4 x thread counts x P for 16-bit backwards, against today's selected kernel.

    git apply bench/experiments/steps-row-granule-4.patch   # chunks of 4 rows, steps of 1, 2 or 4
    python3 bench/experiments/steps.py OUT.jsonl

Run on the H100 on 2026-11-26 (results/steps-H100-2026-11-26.jsonl); the patch is not part of
lntune because four rows a step lost everywhere (bench/NOTES.md), while it would change the
chunking of every backward.

Each (N, dtype, P) is timed with lntune.select.time_plan (poisoned outputs checked against the
first candidate, the selected knobs at that P; time_evaluator medians at M*N = 2**26), together
with its partials sum, so P's cost in partials is counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CASES = [(n, "bfloat16") for n in (1024, 2048, 4096, 5120, 8192)]


def _grid(knobs: dict, allowed: list[int]) -> dict[str, dict]:
    found = {"selected": knobs}
    for step in (2, 4):
        for threads in {int(knobs["threads"] * scale) for scale in (0.5, 1, 2)} & set(allowed):
            found[f"s{step}_t{threads}"] = {**knobs, "rows_per_step": step, "explicit_unroll": 0, "threads": threads}
    return found


def main() -> None:
    from lntune.build import kernels_for
    from lntune.select import time_plan
    from schedules import database, spaces
    from schedules.targets import get_target
    from te_ops.layer_norm import Kernel

    target = get_target("cuda-sm90")
    plan = {}
    for n, dtype in CASES:
        rule = {k.op: k for k in kernels_for(n, dtype, target)}
        chosen = {op: database.choose(rule[op], target).knobs for op in ("backward", "backward_sum")}
        for parts in (rule["backward"].parts // 2, rule["backward"].parts):
            kernel = Kernel("backward", n, dtype, parts)
            plan[kernel] = _grid(chosen["backward"], spaces.thread_candidates(kernel, target, max_per_thread=32))
            plan[Kernel("backward_sum", n, dtype, parts)] = {"selected": chosen["backward_sum"]}
    with Path(sys.argv[1]).open("a") as out:
        for timed in time_plan(target, plan):
            kernel, times = timed.kernel, timed.us
            for label, us in times.items():
                row = {"op": kernel.op, "hidden": kernel.hidden, "dtype": kernel.dtype, "parts": kernel.parts}
                row.update(label=label, knobs=plan[kernel][label], us=round(us, 2))
                out.write(json.dumps(row) + "\n")
            fastest = dict(sorted(times.items(), key=lambda item: item[1])[:4])
            print(kernel.name, {label: round(us, 1) for label, us in fastest.items()}, flush=True)


if __name__ == "__main__":
    main()
