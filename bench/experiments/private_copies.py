"""Does a prefetching backward pay for its software pipeline's block barriers? (CUDA)

    python3 bench/experiments/private_copies.py OUT.json

For the selected kernels of each (N, dtype) below whose backward prefetches rows, builds the
backward and its partials sum twice: with TVM's pipeline barriers ("barriers", as before) and
without them ("private", schedules.private_copies: each thread reads back only the rows it
copied). Before timing, the private build's dx, dgamma and dbeta must equal the other's bit for
bit on two input sets used in turn, ten times over, every output poisoned first. Then the
backward alone and the pair are timed by CUDA events over calls queued back to back, as
`lntune bench` does, at M·N = 2**26, the two builds alternating three times (medians of each).

Measured 2026-11-26 on the H100 (results/private-copies-H100-2026-11-26.json, the tenth session's
selection), pair with barriers -> private, us: float16 N = 1024 160.5 -> 160.1; N = 2048 bfloat16
154.2 -> 152.9, float16 153.9 -> 152.8; N = 4096 154.8 -> 157.1 and 154.6 -> 159.3 (slower);
N = 5120 155.5 -> 154.4, 154.8 -> 154.0; N = 8192 158.7 -> 156.4, 158.2 -> 156.3; N = 16384
181.2 -> 178.3, 171.3 -> 173.5 (slower). Outputs bitwise equal everywhere. Since it loses at
some, it is a knob (`private_copies`) that `lntune select` measures.
"""

from __future__ import annotations

import statistics
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import tvm  # noqa: E402
from pairs import Pairs, run_cases  # noqa: E402

from lntune.bench import _time  # noqa: E402
from lntune.build import compile_module, kernels_for  # noqa: E402
from schedules import database  # noqa: E402

CASES = [(n, dtype) for n in (1024, 2048, 4096, 5120, 8192, 16384) for dtype in ("bfloat16", "float16")]
ELEMENTS = 1 << 26
BUILDS = {"barriers": False, "private": True}
ROUNDS = 3


def _pair(target, hidden: int, dtype: str, private: bool):
    """(backward, sum) functions of one build, or None where the backward does not prefetch."""
    kernels = kernels_for(hidden, dtype, target)[2:]
    knobs = {k.name: database.choose(k, target).knobs for k in kernels}
    if not knobs[kernels[0].name].get("prefetch"):
        return None
    knobs[kernels[0].name] = {**knobs[kernels[0].name], "private_copies": int(private)}
    funcs = {k.name: database.scheduled(k, target, knobs[k.name]) for k in kernels}
    module = compile_module(tvm.IRModule(funcs), target).mod
    return module[kernels[0].name], module[kernels[1].name], kernels[0].parts


def _case(target, hidden: int, dtype: str) -> dict | None:
    builds = {name: _pair(target, hidden, dtype, private) for name, private in BUILDS.items()}
    if builds["private"] is None:
        return None
    rows = ELEMENTS // hidden
    pairs = Pairs(builds, rows, hidden, dtype)
    pairs.expect_equal("barriers", ["private"])
    times: dict[str, list[float]] = {}
    args = pairs.sets[0]
    for _ in range(ROUNDS):
        for build in builds:
            times.setdefault(f"{build} backward", []).append(_time(partial(pairs.backward, build, args), torch))
            times.setdefault(f"{build} pair", []).append(_time(partial(pairs.run, build, args), torch))
    us = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    return {"parts": builds["private"][2], "rows": rows, "us": us}


def _line(us: dict) -> str:
    return (
        f"backward {us['barriers backward']:6.1f} -> {us['private backward']:6.1f}"
        f"  pair {us['barriers pair']:6.1f} -> {us['private pair']:6.1f} us"
    )


if __name__ == "__main__":
    run_cases(_case, CASES, _line, sys.argv[1])
