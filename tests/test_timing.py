"""lntune.timing on the CPU: poisoned runs, distances, TVM and queued timings, rounds taken in turn."""

import ml_dtypes
import numpy as np
import tvm
from tvm import te

from lntune import timing


def _first_half_doubled(n: int = 16):
    """A CPU module `half`: y[i] = 2·x[i] for the first n/2 elements of x."""
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n // 2,), lambda i: x[i] * 2.0, name="y")
    func = te.create_prim_func([x, y]).with_attr("global_symbol", "half")
    return tvm.compile(tvm.IRModule({"half": func}), target="llvm").mod


def test_host_array_broadcasts_and_converts_bfloat16():
    a = timing.host_array([2, 3], "bfloat16", 1.5)
    assert a.dtype == ml_dtypes.bfloat16 and a.shape == (2, 3) and (a.astype(np.float32) == 1.5).all()
    assert timing.host_array([4], "float16", np.arange(4)).dtype == np.float16


def test_relative_distance_scales_by_the_reference_and_keeps_nan():
    want = np.array([3.0, 4.0], dtype=np.float32)
    assert timing.relative_distance(want, want) == 0.0
    assert timing.relative_distance(np.array([3.0, 4.5]), want) == 0.1
    assert timing.relative_distance(np.array([0.5, 0.0]), np.zeros(2)) == 0.5  # a zero reference counts as 1
    assert np.isnan(timing.relative_distance(np.array([np.nan, 4.0]), want))


def test_run_once_poisons_outputs_so_a_skipped_element_stays_nan():
    module, device = _first_half_doubled(), tvm.cpu()
    x = tvm.runtime.tensor(np.arange(16, dtype=np.float32), device)
    y = tvm.runtime.tensor(np.zeros(8, dtype=np.float32), device)
    (got,) = timing.run_once(module, "half", [x, y], [1])
    assert np.array_equal(got, 2 * np.arange(8, dtype=np.float32))
    # A kernel that writes nothing: the poison is what comes back.
    (untouched,) = timing.run_once({"half": lambda *args: None}, "half", [x, y], [1])
    assert np.isnan(untouched).all()


def test_median_us_and_queued_us_time_on_the_cpu():
    module, device = _first_half_doubled(), tvm.cpu()
    args = [
        tvm.runtime.tensor(np.ones(16, dtype=np.float32), device),
        tvm.runtime.tensor(np.zeros(8, "float32"), device),
    ]
    assert 0 < timing.median_us(module, "half", args, device, number=3, repeat=2) < 1e5
    calls = []
    us = timing.queued_us([lambda: calls.append("a"), lambda: calls.append("b")], device, number=4, repeat=3)
    assert us > 0 and calls == ["a", "b"] * 12


def test_least_of_rounds_takes_rounds_in_turn_and_keeps_each_least():
    """Every item once a round, in order; each keeps its least value; keys are any hashable (bench
    keys its passes by (implementation, pass))."""
    seen, values = [], iter([5.0, 3.0, 4.0, 1.0, 2.0, 6.0])

    def measure(fn):
        seen.append(fn())
        return next(values)

    items = {("x", "forward"): lambda: "x", ("y", "backward"): lambda: "y"}
    assert timing.least_of_rounds(measure, items, rounds=3) == {("x", "forward"): 2.0, ("y", "backward"): 1.0}
    assert seen == ["x", "y"] * 3
    assert timing.ROUNDS == 3 and timing.least_of_rounds(lambda fn: fn(), {"c": lambda: 2.0}, rounds=1) == {"c": 2.0}
