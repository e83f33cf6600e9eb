"""`lntune check`: every kernel of a library against the float64 reference, on the library's device.

Inputs are fresh random offset data (mean far from zero, so cancellation errors show); every output
is poisoned with NaN before the call, so an element the kernel never wrote fails the check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm

from lntune.runner import STATS_DTYPE, Library, numpy_dtype
from te_ops import reference

EPS = 1e-5
DEFAULT_ROWS = (1, 37, 1000)
# Outputs in float32 (mean, rstd, and everything of a float32 library) get the float32 tolerance.
STATS_OUTPUTS = ("mean", "rstd")
PARAM_OUTPUTS = ("dgamma", "dbeta")  # the parameters' dtype: float32 beside 16-bit activations when mixed


@dataclass
class Row:
    hidden: int
    dtype: str
    rows: int
    op: str
    output: str
    error: float
    tolerance: float
    param_dtype: str = ""  # gamma, beta, dgamma and dbeta; "" or dtype: the activations' own

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    @property
    def variant(self) -> str:
        """ "bfloat16" or, with float32 parameters, "bfloat16:float32"."""
        return self.dtype if self.param_dtype in ("", self.dtype) else f"{self.dtype}:{self.param_dtype}"


def random_inputs(
    rows: int, hidden: int, dtype: str, rng: np.random.Generator, offset: float = 3.0, param_dtype: str | None = None
):
    """x (offset so |mean| > std) and dy of `dtype`, gamma and beta of `param_dtype` (default `dtype`)."""
    np_dtype, np_param = numpy_dtype(dtype), numpy_dtype(param_dtype or dtype)
    x = (rng.standard_normal((rows, hidden)) + offset).astype(np_dtype)
    gamma = (1.0 + 0.5 * rng.standard_normal(hidden)).astype(np_param)
    beta = rng.standard_normal(hidden).astype(np_param)
    dy = rng.standard_normal((rows, hidden)).astype(np_dtype)
    return x, gamma, beta, dy


def _poisoned(shape, dtype: str, device):
    return tvm.runtime.tensor(np.full(shape, np.nan, dtype=numpy_dtype(dtype)), device)


def _kernel(lib: Library, op: str, hidden: int, dtype: str, param_dtype: str):
    """lib.kernel of one op; a library of (hidden, dtype) pairs (no parameter dtype) takes three arguments."""
    if param_dtype == dtype:
        return lib.kernel(op, hidden, dtype)
    return lib.kernel(op, hidden, dtype, param_dtype)


def _parts(lib: Library, hidden: int, dtype: str, param_dtype: str) -> int:
    """P of the variant's backward (runner's parts_for, or its parts mapping keyed by (hidden, dtype))."""
    if hasattr(lib, "parts_for"):
        return lib.parts_for(hidden, dtype, param_dtype)
    return lib.parts[(hidden, dtype)]


def check_variant(
    lib: Library, hidden: int, dtype: str, rows: int, rng: np.random.Generator, param_dtype: str | None = None
) -> list[Row]:
    """Every output of the variant's four kernels against float64, on fresh offset data, outputs
    poisoned first. y and dx take `dtype`'s tolerance; mean and rstd float32's; dgamma and dbeta
    the parameters' dtype's (float32 for a mixed variant, whose gamma and beta are float32)."""
    param_dtype = param_dtype or dtype
    x, gamma, beta, dy = random_inputs(rows, hidden, dtype, rng, param_dtype=param_dtype)
    dev = lib.device
    on_dev = {k: tvm.runtime.tensor(v, dev) for k, v in dict(x=x, gamma=gamma, beta=beta, dy=dy).items()}
    tolerance = {name: reference.TOLERANCE[dtype] for name in ("y", "dx")}
    tolerance.update({name: reference.TOLERANCE[STATS_DTYPE] for name in STATS_OUTPUTS})
    tolerance.update({name: reference.TOLERANCE[param_dtype] for name in PARAM_OUTPUTS})
    results: list[Row] = []

    def record(op: str, name: str, got, want) -> None:
        error = reference.rel_error(got.numpy(), want)
        results.append(Row(hidden, dtype, rows, op, name, error, tolerance[name], param_dtype))

    def kernel(op: str):
        return _kernel(lib, op, hidden, dtype, param_dtype)

    ref_y, ref_mean, ref_rstd = reference.forward(x, gamma, beta, EPS)
    y, mean, rstd = (
        _poisoned((rows, hidden), dtype, dev),
        _poisoned((rows,), STATS_DTYPE, dev),
        _poisoned((rows,), STATS_DTYPE, dev),
    )
    kernel("forward")(on_dev["x"], on_dev["gamma"], on_dev["beta"], EPS, y, mean, rstd)
    for name, got, want in (("y", y, ref_y), ("mean", mean, ref_mean), ("rstd", rstd, ref_rstd)):
        record("forward", name, got, want)

    mean2, rstd2 = _poisoned((rows,), STATS_DTYPE, dev), _poisoned((rows,), STATS_DTYPE, dev)
    kernel("forward_stats")(on_dev["x"], EPS, mean2, rstd2)
    record("forward_stats", "mean", mean2, ref_mean)
    record("forward_stats", "rstd", rstd2, ref_rstd)

    # The backward takes float32 mean/rstd; the reference is given exactly the same ones.
    mean32, rstd32 = ref_mean.astype(np.float32), ref_rstd.astype(np.float32)
    ref_dx, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean32, rstd32, gamma)
    parts = [_poisoned((_parts(lib, hidden, dtype, param_dtype), hidden), STATS_DTYPE, dev) for _ in range(2)]
    dx = _poisoned((rows, hidden), dtype, dev)
    kernel("backward")(
        on_dev["dy"],
        on_dev["x"],
        tvm.runtime.tensor(mean32, dev),
        tvm.runtime.tensor(rstd32, dev),
        on_dev["gamma"],
        dx,
        *parts,
    )
    dgamma, dbeta = _poisoned((hidden,), param_dtype, dev), _poisoned((hidden,), param_dtype, dev)
    kernel("backward_sum")(*parts, dgamma, dbeta)
    for name, got, want in (("dx", dx, ref_dx), ("dgamma", dgamma, ref_dgamma), ("dbeta", dbeta, ref_dbeta)):
        record("backward", name, got, want)
    return results


def check_library(lib: Library, rows_list=DEFAULT_ROWS, seed: int | None = None) -> list[Row]:
    """check_variant of every variant at every M of `rows_list` (positive ints). Variants are the
    library's (hidden, dtype, param_dtype) triples, or (hidden, dtype) pairs."""
    rows_list = list(rows_list)
    if not rows_list or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in rows_list):
        raise ValueError(f"rows must be a non-empty list of positive integers, got {rows_list!r}")
    rng = np.random.default_rng(seed)
    return [
        row
        for hidden, dtype, *param in lib.variants
        for rows in rows_list
        for row in check_variant(lib, hidden, dtype, rows, rng, param[0] if param else None)
    ]


def format_table(rows: list[Row]) -> str:
    """One line per (variant, M, op): the worst relative error of its outputs against the tolerance."""
    width = max([9] + [len(r.variant) for r in rows])
    lines = [f"{'hidden':>6} {'dtype':>{width}} {'M':>6} {'op':>14}  outputs (rel. error / tolerance)"]
    keyed: dict[tuple, list[Row]] = {}
    for r in rows:
        keyed.setdefault((r.hidden, r.variant, r.rows, r.op), []).append(r)
    for (hidden, variant, m, op), group in keyed.items():
        cells = "  ".join(f"{r.output}={r.error:.1e}/{r.tolerance:.0e}{'' if r.ok else ' FAIL'}" for r in group)
        lines.append(f"{hidden:>6} {variant:>{width}} {m:>6} {op:>14}  {cells}")
    return "\n".join(lines)
