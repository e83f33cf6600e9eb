"""Run or time one backward kernel with today's knobs and with some of them changed (CUDA).

    python3 bench/experiments/knob_probe.py N DTYPE P [--once] [KNOB=V,KNOB=V ...]

P as select --parts writes it: "66", or "66g1" for chunks rounded to single rows.

Each argument after the options is one variant: today's selected knobs with those values changed
("" or "today": unchanged). With --once each variant runs once, in the order given, for Nsight
Compute (`ncu -k regex:lntune_backward ...`; the launches come in that order); without it each is
timed at M = 2**26 // N (select's timer, median of 5 x 20). Every variant is checked against the
first one's outputs before anything else (relative norm, as select does).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import tvm  # noqa: E402

from lntune import build, select  # noqa: E402
from schedules import database  # noqa: E402
from schedules.targets import get_target  # noqa: E402
from te_ops.layer_norm import Kernel  # noqa: E402


def _changed(text: str) -> dict[str, int]:
    if text in ("", "today"):
        return {}
    return {name: int(value) for name, value in (part.split("=") for part in text.split(","))}


def main() -> None:
    hidden, dtype, (parts, granule) = int(sys.argv[1]), sys.argv[2], select.parse_chunking(sys.argv[3])
    once = "--once" in sys.argv
    labels = [a for a in sys.argv[4:] if a != "--once"] or ["today"]
    target, device = get_target("cuda-sm90"), tvm.cuda()
    kernel = Kernel("backward", hidden, dtype, parts, granule)
    today = database.choose(kernel, target).knobs
    rows = (1 << 26) // hidden
    args = select.device_arguments(kernel, rows, device, np.random.default_rng(0))
    outputs = select.output_positions(kernel)
    modules, reference = {}, None
    for label in labels:
        knobs = database.exact_knobs(kernel, target, {**today, **_changed(label)})
        if knobs is None:
            raise SystemExit(f"{label}: not knobs of {kernel.name}'s space")
        modules[label] = build.kernel_library(kernel, target, knobs).mod
        got = select._run_once(modules[label], kernel.name, args, outputs)
        reference = reference or got
        worst = max(select._relative_distance(g, w) for g, w in zip(got, reference, strict=True))
        print(f"{label or 'today'}: {knobs}  distance from the first {worst:.1e}", flush=True)
        if not worst <= select.AGREEMENT[dtype]:
            raise SystemExit(f"{label}: outputs differ from the first variant's")
    for label, module in modules.items():
        if once:
            module[kernel.name](*args)
            device.sync()
        else:
            print(f"{label or 'today'}: {select._median_us(module, kernel.name, args, device):.1f} us", flush=True)


if __name__ == "__main__":
    main()
