"""`lntune check`: every kernel of a library against the float64 reference, on the library's device.

Inputs are fresh random offset data (mean far from zero, so cancellation errors show); every output
is poisoned with NaN before the call, so an element the kernel never wrote fails the check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm

from lntune.runner import STATS_DTYPE, Library, _numpy_dtype
from te_ops import reference

EPS = 1e-5
DEFAULT_ROWS = (1, 37, 1000)
# Outputs in float32 (mean, rstd, and everything of a float32 library) get the float32 tolerance.
STATS_OUTPUTS = ("mean", "rstd")


@dataclass
class Row:
    hidden: int
    dtype: str
    rows: int
    op: str
    output: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def random_inputs(rows: int, hidden: int, dtype: str, rng: np.random.Generator, offset: float = 3.0):
    """x (offset so |mean| > std), gamma, beta, dy as numpy arrays of `dtype`."""
    np_dtype = _numpy_dtype(dtype)
    x = (rng.standard_normal((rows, hidden)) + offset).astype(np_dtype)
    gamma = (1.0 + 0.5 * rng.standard_normal(hidden)).astype(np_dtype)
    beta = rng.standard_normal(hidden).astype(np_dtype)
    dy = rng.standard_normal((rows, hidden)).astype(np_dtype)
    return x, gamma, beta, dy


def _poisoned(shape, dtype: str, device):
    return tvm.runtime.tensor(np.full(shape, np.nan, dtype=_numpy_dtype(dtype)), device)


def check_variant(lib: Library, hidden: int, dtype: str, rows: int, rng: np.random.Generator) -> list[Row]:
    x, gamma, beta, dy = random_inputs(rows, hidden, dtype, rng)
    dev = lib.device
    on_dev = {k: tvm.runtime.tensor(v, dev) for k, v in dict(x=x, gamma=gamma, beta=beta, dy=dy).items()}
    tol = reference.TOLERANCE[dtype]
    stats_tol = reference.TOLERANCE[STATS_DTYPE]
    results: list[Row] = []

    def record(op: str, name: str, got, want) -> None:
        t = stats_tol if name in STATS_OUTPUTS else tol
        results.append(Row(hidden, dtype, rows, op, name, reference.rel_error(got.numpy(), want), t))

    ref_y, ref_mean, ref_rstd = reference.forward(x, gamma, beta, EPS)
    y, mean, rstd = (
        _poisoned((rows, hidden), dtype, dev),
        _poisoned((rows,), STATS_DTYPE, dev),
        _poisoned((rows,), STATS_DTYPE, dev),
    )
    lib.kernel("forward", hidden, dtype)(on_dev["x"], on_dev["gamma"], on_dev["beta"], EPS, y, mean, rstd)
    for name, got, want in (("y", y, ref_y), ("mean", mean, ref_mean), ("rstd", rstd, ref_rstd)):
        record("forward", name, got, want)

    mean2, rstd2 = _poisoned((rows,), STATS_DTYPE, dev), _poisoned((rows,), STATS_DTYPE, dev)
    lib.kernel("forward_stats", hidden, dtype)(on_dev["x"], EPS, mean2, rstd2)
    record("forward_stats", "mean", mean2, ref_mean)
    record("forward_stats", "rstd", rstd2, ref_rstd)

    # The backward takes float32 mean/rstd; the reference is given exactly the same ones.
    mean32, rstd32 = ref_mean.astype(np.float32), ref_rstd.astype(np.float32)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean32, rstd32, gamma)
    parts = [_poisoned((lib.parts[(hidden, dtype)], hidden), STATS_DTYPE, dev) for _ in range(2)]
    dx = _poisoned((rows, hidden), dtype, dev)
    lib.kernel("backward", hidden, dtype)(
        on_dev["dy"],
        on_dev["x"],
        tvm.runtime.tensor(mean32, dev),
        tvm.runtime.tensor(rstd32, dev),
        on_dev["gamma"],
        dx,
        *parts,
    )
    dgamma, dbeta = _poisoned((hidden,), dtype, dev), _poisoned((hidden,), dtype, dev)
    lib.kernel("backward_sum", hidden, dtype)(*parts, dgamma, dbeta)
    for name, got, want in (("dx", dx, ref_dx), ("dgamma", dgamma, ref_dgamma), ("dbeta", dbeta, ref_dbeta)):
        record("backward", name, got, want)
    return results


def check_library(lib: Library, rows_list=DEFAULT_ROWS, seed: int | None = None) -> list[Row]:
    rng = np.random.default_rng(seed)
    return [
        row
        for hidden, dtype in lib.variants
        for rows in rows_list
        for row in check_variant(lib, hidden, dtype, rows, rng)
    ]


def format_table(rows: list[Row]) -> str:
    """One line per (variant, M, op): the worst relative error of its outputs against the tolerance."""
    lines = [f"{'hidden':>6} {'dtype':>9} {'M':>6} {'op':>14}  outputs (rel. error / tolerance)"]
    keyed: dict[tuple, list[Row]] = {}
    for r in rows:
        keyed.setdefault((r.hidden, r.dtype, r.rows, r.op), []).append(r)
    for (hidden, dtype, m, op), group in keyed.items():
        cells = "  ".join(f"{r.output}={r.error:.1e}/{r.tolerance:.0e}{'' if r.ok else ' FAIL'}" for r in group)
        lines.append(f"{hidden:>6} {dtype:>9} {m:>6} {op:>14}  {cells}")
    return "\n".join(lines)
