"""Cluster backward at N = 16384: does it want half the chunks (one wave of blocks)?

    python3 bench/experiments/cluster_parts.py OUT.json

With P chunks of rows, a cluster kernel launches 2P blocks; at P = 132 and one 1024-thread block
an SM that is two waves, each block with half a row. select times every candidate at the
kernel's P, so this times today's choice and a few cluster layouts (among them the N = 8192
winner's: staged rows prefetched one step, 1024 threads) at P = 66 and P = 132, through
lntune.select.time_plan (built as export builds them, checked against today's choice on
NaN-poisoned outputs, median of TVM's time_evaluator), M = 4096.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lntune import select  # noqa: E402
from schedules import database  # noqa: E402
from schedules.targets import get_target  # noqa: E402
from te_ops.layer_norm import Kernel  # noqa: E402

LAYOUTS = {
    "plain": {"chunked": 1, "rows_per_step": 1},
    "prefetch1": {"chunked": 1, "rows_per_step": 1, "prefetch": 1},
    "staged-prefetch1": {"chunked": 1, "rows_per_step": 1, "prefetch": 1, "stage_rows": 2, "row_scalars": 0},
    "staged-prefetch1-occ": {
        "chunked": 1,
        "rows_per_step": 1,
        "prefetch": 1,
        "stage_rows": 2,
        "row_scalars": 0,
        "threads_per_sm": 1024,
    },
}


def main() -> None:
    target = get_target("cuda-sm90")
    plan = {}
    for dtype in ("bfloat16", "float16"):
        today_kernel = Kernel("backward", 16384, dtype, database.selected_parts(target, 16384, dtype))
        today = database.choose(today_kernel, target).knobs
        base = {**today, "cluster": 2, "threads": 1024, "cache_rows": 1, "shared_acc": 0, "row_scalars": 1}
        base.update(stage_rows=0, prefetch=0, threads_per_sm=0, explicit_unroll=0)
        for parts in (66, 132):
            kernel = replace(today_kernel, parts=parts)
            labelled = {"today": today}
            for name, layout in LAYOUTS.items():
                knobs = database.exact_knobs(kernel, target, {**base, **layout})
                if knobs:
                    labelled[name] = knobs
            plan[kernel] = labelled
    results = {}
    for timed in select.time_plan(target, plan, elements=16384 * 4096, log=print):
        results[timed.kernel.name] = timed.us
        print(timed.kernel.name, {k: round(v, 1) for k, v in sorted(timed.us.items(), key=lambda kv: kv[1])})
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
