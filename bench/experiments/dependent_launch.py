"""Does launching the partials sum as a programmatic dependent of the backward pay? (CUDA sm_90+)

    python3 bench/experiments/dependent_launch.py OUT.json

For the selected kernels of each (N, dtype) below, builds the backward and its partials sum three
ways (BUILDS: plain; the sum a programmatic dependent, as export builds them now; and the backward
also allowing the sum's launch from its blocks' start) and times them by CUDA events over calls
queued back to back, as `lntune bench` does, at M·N = 2**26: the backward alone, the sum alone,
and the pair, also split by an event between the two. Before timing, each build's outputs must
equal the plain build's bit for bit on two input sets used in turn, ten times over: a sum that
read the partials before the backward had written them would see the other set's.

Measured 2026-11-26 on the H100 (results/dependent-launch-H100-2026-11-26.json, with the sums of
select-s10-sums.txt), pair plain / dependent / early, us: bfloat16 N = 1024 159.2 / 157.7 / 159.4,
float16 N = 1024 161.0 / 159.7 / 166.6, float32 N = 1024 297.7 / 296.0 / 296.2, bfloat16 N = 5120
161.6 / 160.3 / 166.2, N = 8192 160.3 / 158.8 / 161.9, N = 16384 183.1 / 181.7 / 183.0, float32
N = 16384 312.6 / 311.2 / 315.0. The dependent sum: 1.3-1.5 us less everywhere; the early trigger
up to 6 us more. Outputs bitwise equal in all three. "Sum alone" here is bound by the host's
launches (12-19 us a call from Python with torch tensors); select's times are the device's.
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

CASES = [
    (1024, "bfloat16"),
    (1024, "float16"),
    (1024, "float32"),
    (5120, "bfloat16"),
    (8192, "bfloat16"),
    (16384, "bfloat16"),
    (16384, "float32"),
]
ELEMENTS = 1 << 26


# Launch roles per build: none (as before), the sum alone a dependent (its launch implicitly
# allowed as the backward's blocks exit), and the backward allowing it from its blocks' start.
BUILDS = {
    "plain": {},
    "dependent": {"backward_sum": "dependent"},
    "early": {"backward": "primary", "backward_sum": "dependent"},
}


def _pair(target, hidden: int, dtype: str, roles_of_build: dict):
    """(backward, sum) functions of one build with these launch roles."""
    kernels = kernels_for(hidden, dtype, target)[2:]
    roles = database.LAUNCH_ROLES
    database.LAUNCH_ROLES = roles_of_build
    try:
        funcs = {k.name: database.scheduled(k, target, database.choose(k, target).knobs) for k in kernels}
    finally:
        database.LAUNCH_ROLES = roles
    module = compile_module(tvm.IRModule(funcs), target).mod
    return module[kernels[0].name], module[kernels[1].name], kernels[0].parts


def _split(first, second) -> tuple[float, float]:
    """Median us from before `first` to after it, and from there to after `second`, queued back to back."""
    for _ in range(5):
        first(), second()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(40)]
    for start, middle, end in events:
        start.record()
        first()
        middle.record()
        second()
        end.record()
    torch.cuda.synchronize()
    return (
        statistics.median(s.elapsed_time(m) * 1e3 for s, m, _ in events),
        statistics.median(m.elapsed_time(e) * 1e3 for _, m, e in events),
    )


def _case(target, hidden: int, dtype: str) -> dict:
    rows = ELEMENTS // hidden
    pairs = Pairs({name: _pair(target, hidden, dtype, roles) for name, roles in BUILDS.items()}, rows, hidden, dtype)
    pairs.expect_equal("plain", list(BUILDS))
    us, args = {}, pairs.sets[0]
    for build in BUILDS:
        us[f"{build} backward"] = _time(partial(pairs.backward, build, args), torch) * 1e3
        us[f"{build} sum"] = _time(partial(pairs.sum, build), torch) * 1e3
        us[f"{build} pair"] = _time(partial(pairs.run, build, args), torch) * 1e3
        split = _split(partial(pairs.backward, build, args), partial(pairs.sum, build))
        us[f"{build} pair: backward"], us[f"{build} pair: sum"] = split
    parts = pairs.builds["plain"][2]
    return {"parts": parts, "rows": rows, "us": {k: round(v, 2) for k, v in us.items()}}


def _line(us: dict) -> str:
    return (
        "pair: "
        + " ".join(
            f"{b} {us[f'{b} pair']:6.1f} ({us[f'{b} pair: backward']:.1f} + {us[f'{b} pair: sum']:.1f})" for b in BUILDS
        )
        + " us"
    )


if __name__ == "__main__":
    run_cases(_case, CASES, _line, sys.argv[1])
