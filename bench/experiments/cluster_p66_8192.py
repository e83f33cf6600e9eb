"""16-bit N = 8192: would cluster kernels at P = 66 beat today's one-block kernels at P = 132?

    python3 bench/experiments/cluster_p66_8192.py OUT.json

At N = 16384, P = 66 (one wave of one block an SM, half the partial rows) took 6-8 us off the
cluster kernels. At N = 8192 the best cluster candidates (counted exchange) ran 157.7-163.5 us
at P = 132 against 155 for today's kernels, whose partials are [132, 8192]. This times, through
lntune.select.time_plan (built as export builds them, checked against the first candidate on
NaN-poisoned outputs), today's backward and partials sum at P = 132 against the four fastest
cluster candidates of the ninth session's `--focus cluster=2,chunked=1` select (its timings are in
selection.json as of commit 9110aa1) at P = 66 with today's sum there, M = 8192, and prints
backward + sum for each.

Measured 2026-11-26 on the H100 (results/cluster-p66-8192-H100-2026-11-26.json), backward + sum:
today's kernels at P = 132 160.1 us (bfloat16; sum 4.6) and 159.0 (float16; sum 4.0); cluster
candidates at P = 66 184.1-231.0 us. Half the blocks of 512 threads leave an SM 16 warps, and the
partials sum at P = 132 is only 4-4.6 us: no.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lntune import select  # noqa: E402
from schedules import database  # noqa: E402
from schedules.targets import get_target  # noqa: E402
from te_ops.layer_norm import Kernel  # noqa: E402

HIDDEN, TODAY_P, CLUSTER_P = 8192, 132, 66
# The four fastest cluster candidates there, in both 16-bit dtypes (157.7-167.5 us at P = 132).
FASTEST = ("variant465", "variant477", "variant466", "variant400")


def _fastest_cluster(kernel: Kernel, target) -> dict[str, dict]:
    found, _ = select.candidates(kernel, target, database.read_records(database.TUNING_LOGS / target.name))
    assert all(found[label]["cluster"] for label in FASTEST)
    return {label: found[label] for label in FASTEST}


def main() -> None:
    target = get_target("cuda-sm90")
    plan = {}
    for dtype in ("bfloat16", "float16"):
        today = Kernel("backward", HIDDEN, dtype, TODAY_P)
        total = Kernel("backward_sum", HIDDEN, dtype, TODAY_P)
        plan[today] = {"today": database.choose(today, target).knobs}
        plan[total] = {"today": database.choose(total, target).knobs}
        plan[Kernel("backward", HIDDEN, dtype, CLUSTER_P)] = _fastest_cluster(today, target)
        plan[Kernel("backward_sum", HIDDEN, dtype, CLUSTER_P)] = plan[total]
    us = {}
    for timed in select.time_plan(target, plan, elements=HIDDEN * HIDDEN, log=print):
        us[timed.kernel.name] = {label: round(t, 1) for label, t in timed.us.items()}
    results = {}
    for dtype in ("bfloat16", "float16"):
        for parts in (TODAY_P, CLUSTER_P):
            main_us = us.get(Kernel("backward", HIDDEN, dtype, parts).name, {})
            sum_us = us.get(Kernel("backward_sum", HIDDEN, dtype, parts).name, {}).get("today")
            for label, t in main_us.items():
                total_us = round(t + sum_us, 1) if sum_us else None
                results[f"{dtype} P={parts} {label}"] = {"backward": t, "sum": sum_us, "total": total_us}
                print(f"{dtype:<9} P={parts:<4} {label:<12} backward {t:7.1f} + sum {sum_us} = {total_us} us")
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
