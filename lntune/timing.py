"""Measuring kernels on a device: the helpers `lntune select`, `lntune bench` and `lntune bench --step` share.

- `run_once` runs a compiled kernel once on NaN-poisoned outputs, so an element it does not write
  stays NaN; `relative_distance` compares two results (NaN stays NaN, so it fails any bound);
  `host_array` makes the host data of a tensor of a kernel's dtype (bfloat16 through ml_dtypes).
- `median_us` times one kernel of a TVM module with TVM's time_evaluator; `queued_us` times a round
  of calls queued back to back, between two device syncs (for kernels that must run as a pair).
- `least_of_rounds` takes the least of ROUNDS measurements of each of several callables, the rounds
  taken in turn over all of them, so that a slow spell of the host or the device spoils one round of
  one of them, not its result (why: docs/performance.md, "How lntune measures").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence

import numpy as np

ROUNDS = 3


def host_array(shape: Sequence[int], dtype: str, data: np.ndarray | float) -> np.ndarray:
    """`data` broadcast to `shape` as a numpy array of `dtype` (a TVM dtype name: bfloat16 too)."""
    numpy_dtype = __import__("ml_dtypes").bfloat16 if dtype == "bfloat16" else dtype
    return np.broadcast_to(np.asarray(data, dtype=np.float32), list(shape)).astype(numpy_dtype)


def relative_distance(got: np.ndarray, want: np.ndarray) -> float:
    """‖got − want‖ / ‖want‖ in float64 (‖want‖ = 0 counts as 1); NaN where got holds a NaN."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    scale = float(np.linalg.norm(want)) or 1.0
    return float(np.linalg.norm(got - want)) / scale


def run_once(module, name: str, args: list, outputs: list[int]) -> list[np.ndarray]:
    """Run `module[name](*args)` on NaN-poisoned outputs (the tensors at `outputs` in args) and return
    them as numpy arrays; an element the kernel skipped stays NaN."""
    for index in outputs:
        args[index].copyfrom(host_array(list(args[index].shape), str(args[index].dtype), np.nan))
    module[name](*args)
    return [args[index].numpy() for index in outputs]


def median_us(module, name: str, args: list, device, number: int = 20, repeat: int = 5) -> float:
    """Median microseconds of `module[name](*args)`: TVM's time_evaluator, `repeat` rounds of `number` calls."""
    timer = module.time_evaluator(name, device, number=number, repeat=repeat)
    return float(np.median(timer(*args).results)) * 1e6


def queued_us(calls: Sequence[Callable[[], object]], device, number: int = 20, repeat: int = 5) -> float:
    """Median microseconds of one round of `calls`, `number` rounds queued back to back, by the host's
    clock between device syncs (the device's time where, as for a backward, it exceeds the host's)."""
    rounds = []
    for _ in range(repeat):
        device.sync()
        start = time.perf_counter()
        for _ in range(number):
            for call in calls:
                call()
        device.sync()
        rounds.append((time.perf_counter() - start) / number)
    return float(np.median(rounds)) * 1e6


def least_of_rounds(
    measure: Callable[[Callable], float], items: dict[Hashable, Callable], rounds: int = ROUNDS
) -> dict[Hashable, float]:
    """key -> the least of `rounds` values of `measure(items[key])`, the rounds taken in turn over
    all the items (every item measured once a round)."""
    best: dict[Hashable, float] = {}
    for _ in range(rounds):
        for key, fn in items.items():
            best[key] = min(best.get(key, math.inf), measure(fn))
    return best
