"""What does the per-row cluster exchange cost? (bfloat16 backward, N = 16384, M = 4096)

    python3 bench/experiments/cluster_cost.py OUT.json

Times three cluster layouts as select builds them ("exchange": publish, the row's partial-sum
updates, collect), then the same kernels with no exchange ("none": each block doubles its own
half's sums, so dx is wrong and only timed): the gap is what the exchange costs.

Measured 2026-11-26 on the H100 (exchange / cluster barrier without the remote read / none):
- one cluster barrier a row, before the partial-sum updates: plain 270.6 / 263.4 / 212.5 us,
  staged + prefetched 255.3 / 264.6 / 197.1 us;
- barrier arrive before the updates, wait after them: plain 280.7 / 243.5 / 203.9, two rows a
  step 245.4 / 243.5 / 187.9, staged + prefetched 267.3 / 260.4 / 174.8 us.
Then the exchange became the push of sums and a row tag (no barrier a row); see the results file
of this script's latest run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tvm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lntune import select  # noqa: E402
from lntune.build import compile_module  # noqa: E402
from schedules import cluster, database  # noqa: E402
from schedules.targets import get_target  # noqa: E402
from te_ops.layer_norm import Kernel  # noqa: E402

_PUBLISH = (
    "__device__ __forceinline__ int lntune_cluster_publish(float a, float b, int parity, int tag) { return 0; }\n"
)
_COLLECT = (
    "__device__ __forceinline__ float2 lntune_cluster_collect(float a, float b, int parity, int tag) "
    "{ return make_float2(a + a, b + b); }\n"
)
# (publish, collect) sources: the product's, then with no exchange at all.
HELPERS = {"exchange": (cluster.PUBLISH_SOURCE, cluster.COLLECT_SOURCE), "none": (_PUBLISH, _COLLECT)}
LAYOUTS = {
    "plain": {},
    "plain-2rows": {"rows_per_step": 2},
    "staged-prefetch1": {"prefetch": 1, "stage_rows": 2, "row_scalars": 0},
}


def main() -> None:
    target, device, rng = get_target("cuda-sm90"), tvm.cuda(0), np.random.default_rng(0)
    kernel = Kernel("backward", 16384, "bfloat16", 132)
    base = {**database.choose(kernel, target).knobs, "cluster": 2, "threads": 1024, "chunked": 1}
    base.update(cache_rows=1, shared_acc=0, row_scalars=1, stage_rows=0, prefetch=0, threads_per_sm=0)
    args = select.device_arguments(kernel, 4096, device, rng)
    results = {}
    for layout, extra in LAYOUTS.items():
        knobs = database.exact_knobs(kernel, target, {**base, **extra})
        for helper, (publish, collect) in HELPERS.items():
            cluster.PUBLISH_SOURCE, cluster.COLLECT_SOURCE = publish, collect
            lib = compile_module(tvm.IRModule({kernel.name: database.scheduled(kernel, target, knobs)}), target)
            results[f"{layout} / {helper}"] = us = select._median_us(lib.mod, kernel.name, args, device)
            print(f"{layout:<18} {helper:<13} {us:7.1f} us", flush=True)
    cluster.PUBLISH_SOURCE, cluster.COLLECT_SOURCE = HELPERS["exchange"]
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
