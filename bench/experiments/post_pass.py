"""One of lntune's CUDA-source rewrites on and off, on today's backward kernels (CUDA, H100).

    python3 bench/experiments/post_pass.py OUT.json REWRITE N,DTYPE,P [N,DTYPE,P ...]

P as select --parts writes it: "66", or "66g1" for chunks rounded to single rows.

REWRITE names a function registered with schedules.cuda_source.add (`whole_vector_stores`,
`exchange_warp_partials`, ...). Each kernel is built as export builds it, and again without that
rewrite; both run on two sets of fresh inputs (NaN-poisoned outputs: every element written?), the
rewritten one twice (bitwise equal from run to run?), at M = 2**26 // N; then each is timed
(select's timer, median of 5 x 20) in three rounds taken in turn.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import tvm  # noqa: E402

from lntune import build, select  # noqa: E402
from schedules import cuda_source, database  # noqa: E402
from schedules.targets import get_target  # noqa: E402
from te_ops.layer_norm import Kernel  # noqa: E402

ROUNDS = 3


def _build_without(kernel: Kernel, target, knobs: dict, name: str):
    with cuda_source.without(name):
        return build.kernel_library(kernel, target, knobs).mod


def _unwritten(outputs: list[np.ndarray]) -> int:
    return int(sum(np.isnan(np.asarray(o, dtype=np.float32)).sum() for o in outputs))


def compare(kernel: Kernel, name: str) -> dict:
    target, device = get_target("cuda-sm90"), tvm.cuda()
    knobs = database.choose(kernel, target).knobs
    modules = {
        "with": build.kernel_library(kernel, target, knobs).mod,
        "without": _build_without(kernel, target, knobs, name),
    }
    sources = {k: m.imports[0].inspect_source() for k, m in modules.items()}
    if sources["with"] == sources["without"]:
        raise SystemExit(f"{name} does not change {kernel.name}'s source")
    rows = (1 << 26) // kernel.hidden
    outputs = select.output_positions(kernel)
    found: dict = {"knobs": knobs, "checks": []}
    for seed in (0, 1):
        args = select.device_arguments(kernel, rows, device, np.random.default_rng(seed))
        without = select._run_once(modules["without"], kernel.name, args, outputs)
        first = select._run_once(modules["with"], kernel.name, args, outputs)
        again = select._run_once(modules["with"], kernel.name, args, outputs)
        found["checks"].append(
            {
                "seed": seed,
                "distance": max(select._relative_distance(a, b) for a, b in zip(first, without, strict=True)),
                "repeat_bitwise": all(np.array_equal(a, b, equal_nan=True) for a, b in zip(first, again, strict=True)),
                "unwritten": _unwritten(first) + _unwritten(without),
            }
        )
    found["us"] = {k: [] for k in modules}
    for _ in range(ROUNDS):
        for label, module in modules.items():
            found["us"][label].append(round(select._median_us(module, kernel.name, args, device), 1))
    return found


def main() -> None:
    out, name, cases = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    results = {"rewrite": name, "device": tvm.cuda().device_name, "kernels": {}}
    for case in cases:
        hidden, dtype, parts = case.split(",")
        kernel = Kernel("backward", int(hidden), dtype, *select.parse_chunking(parts))
        results["kernels"][kernel.name] = found = compare(kernel, name)
        print(kernel.name, json.dumps({k: v for k, v in found.items() if k != "knobs"}), flush=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
