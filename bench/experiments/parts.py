"""Time the backward and its partials sum at several P (row chunks) with today's selected knobs.

    python3 bench/experiments/parts.py OUT.jsonl

P was a rule (schedules.spaces.parts_for) when this was written; `lntune select --parts` now does
the same measurement and keeps the winner. This measures what other values would give, kernel by
kernel, with lntune.select.time_plan (time_evaluator medians, M*N = 2**26).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CASES = [(n, d) for d in ("bfloat16", "float32") for n in (768, 1024, 2048, 4096, 5120, 8192, 16384)]
PARTS = (132, 264, 528, 1056)


def main() -> None:
    from lntune.build import kernels_for
    from lntune.select import time_plan
    from schedules import database
    from schedules.targets import get_target
    from te_ops.layer_norm import Kernel

    target = get_target("cuda-sm90")
    plan = {}
    for n, dtype in CASES:
        rule = {k.op: k for k in kernels_for(n, dtype, target)}
        knobs = {op: database.choose(rule[op], target).knobs for op in ("backward", "backward_sum")}
        for parts in PARTS:
            for op in ("backward", "backward_sum"):
                plan[Kernel(op, n, dtype, parts)] = {"chosen": knobs[op]}
    with Path(sys.argv[1]).open("a") as out:
        for timed in time_plan(target, plan):
            kernel, rows, times = timed.kernel, timed.rows, timed.us
            row = {"op": kernel.op, "hidden": kernel.hidden, "dtype": kernel.dtype, "parts": kernel.parts}
            row.update(rows=rows, us=round(times.get("chosen", float("nan")), 2))
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
