"""What does the per-row cluster exchange cost, by protocol? (backward, N = 16384, M = 4096)

    python3 bench/experiments/cluster_cost.py OUT.json [CASE ...]

CASE names cases to run (default all): "bfloat16 today", "bfloat16 staged-prefetch1", ...
Builds today's N = 16384 choice of each dtype (and for bfloat16 the staged, prefetched layout
that paid the most for its exchange) with each exchange protocol of schedules.cluster ("tagged",
"counted") and with none ("none": each block doubles its own half's sums, so dx is wrong and
only timed), built as export builds them. Each is run in its own process (a protocol that
deadlocks is killed and reported): outputs hashed on NaN-poisoned buffers, compared with the
first protocol's (the protocols move the same sums, so the same bits), and timed with TVM's
time_evaluator (median).

Since the twelfth session a kernel built with "counted" gets the warps exchange from the CUDA
post-pass (schedules.cluster.exchange_warp_partials); experiments/post_pass.py compares the two.

Measured 2026-11-26 on the H100 (results/cluster-protocols-16384-H100-2026-11-26.json, run
with the protocols then called release = tagged, mbarrier = counted):
- bfloat16: tagged 219.8, counted 190.0, none 194.6 us; float16: 203.1, 184.1, 177.2 us;
  same bits, every element written. float32's choice (interleaved row caches): tagged 303.0,
  counted 434.6 us (ptxas left its span-sized caches in a 48 KB stack frame once st.async was in
  the kernel).
- A third protocol hung in both 16-bit kernels: each sum in one 8-byte word beside the row's
  tag, stored to the partner's shared memory (st.relaxed.cluster, as one v2.u64 or two u64, or
  weak st with ld.volatile polling) and polled there until both tags match; in float32 it
  stopped with cudaErrorMisalignedAddress, and the GPU then reported no device to the next
  processes. Not understood; not pursued.
Earlier, bfloat16 (exchange / cluster barrier without the remote read / none): one cluster
barrier a row, before the partial-sum updates: plain 270.6 / 263.4 / 212.5 us, staged +
prefetched 255.3 / 264.6 / 197.1 us; barrier arrive before the updates, wait after them: plain
280.7 / 243.5 / 203.9, two rows a step 245.4 / 243.5 / 187.9, staged + prefetched
267.3 / 260.4 / 174.8 us. The tagged push then: plain 257.8 / none 205.8, two rows a step
238.3 / 188.0, staged + prefetched 265.4 / 180.8 us.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lntune import build, select  # noqa: E402
from schedules import cluster, database  # noqa: E402
from schedules.targets import get_target  # noqa: E402
from te_ops.layer_norm import Kernel  # noqa: E402

_NONE = """
__device__ __forceinline__ void lntune_cluster_start_none() { lntune_cluster_barrier(); }
__device__ __forceinline__ int lntune_cluster_publish_none(float a, float b, int rel) { return 0; }
__device__ __forceinline__ float2 lntune_cluster_collect_none(float a, float b, int rel) {
  return make_float2(a + a, b + b);
}
__device__ __forceinline__ void lntune_cluster_finish_none() { lntune_cluster_barrier(); }
"""
PROTOCOLS = ("tagged", "counted", "none")
TIMEOUT_S = 25  # a protocol that deadlocks is reported, not waited on
STAGED = {"chunked": 1, "rows_per_step": 1, "prefetch": 1, "stage_rows": 2, "row_scalars": 0, "threads": 1024}


def cases() -> dict[str, tuple[Kernel, dict]]:
    target, found = get_target("cuda-sm90"), {}
    for dtype in ("bfloat16", "float16", "float32"):
        kernel = Kernel("backward", 16384, dtype, *database.selected_chunking(target, 16384, dtype))
        found[f"{dtype} today"] = (kernel, database.choose(kernel, target).knobs)
    kernel, today = found["bfloat16 today"]
    found["bfloat16 staged-prefetch1"] = (kernel, database.exact_knobs(kernel, target, {**today, **STAGED}))
    return found


def _build(job: tuple[Kernel, dict, str, str]) -> str:
    kernel, knobs, protocol, path = job
    cluster.PROTOCOLS["none"] = cluster._BARRIER + _NONE
    cluster.protocol_for = lambda knobs: protocol
    build.kernel_library(kernel, get_target("cuda-sm90"), knobs).export_library(path)
    return path


def _time_one(path: str, case: str) -> dict:
    """In its own process (a protocol that hangs is killed there): the outputs' hash on
    NaN-poisoned buffers, their unwritten elements, and the median us."""
    import tvm

    kernel = cases()[case][0]
    device = tvm.cuda(0)
    args = select.device_arguments(kernel, 4096, device, np.random.default_rng(0))
    outputs = select.output_positions(kernel)
    module = tvm.runtime.load_module(path)
    got = select._run_once(module, kernel.name, args, outputs)
    digest = hashlib.sha256(b"".join(g.tobytes() for g in got)).hexdigest()[:16]
    unwritten = int(sum(np.isnan(g.astype(np.float32)).sum() for g in got))
    return {
        "us": round(select._median_us(module, kernel.name, args, device), 1),
        "hash": digest,
        "unwritten": unwritten,
    }


def main() -> None:
    if sys.argv[1] == "--time":
        print(json.dumps(_time_one(sys.argv[2], sys.argv[3])))
        return
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        wanted = sys.argv[2:] or list(cases())
        keys = [(case, protocol) for case in wanted for protocol in PROTOCOLS]
        jobs = {
            (case, protocol): (*cases()[case], protocol, os.path.join(scratch, f"{i}.so"))
            for i, (case, protocol) in enumerate(keys)
        }
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(os.sched_getaffinity(0)), mp_context=context) as pool:
            paths = dict(zip(jobs, pool.map(_build, jobs.values()), strict=True))
        for (case, protocol), path in paths.items():
            command = [sys.executable, __file__, "--time", path, case]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=True)
                timed = json.loads(done.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                timed = {"hung": f"killed after {TIMEOUT_S} s"}
            except subprocess.CalledProcessError as err:
                timed = {"failed": err.stderr.strip().splitlines()[-1][:200]}
            first = results.setdefault(case, {}).get(PROTOCOLS[0], {}).get("hash")
            if "hash" in timed and first:
                timed[f"same_bits_as_{PROTOCOLS[0]}"] = timed["hash"] == first
            results[case][protocol] = timed
            print(f"{case:<28} {protocol:<15} {timed}", flush=True)
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
