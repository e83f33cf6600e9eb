"""Every kernel × dtype × hidden size × row count on the CPU (llvm) against the float64 reference.

Inputs are fresh random offset data; every output is poisoned with NaN before the kernel runs
(lntune.check), so an element that is never written fails the comparison.
"""

import numpy as np
import pytest

from lntune.check import check_variant
from te_ops import reference

from .conftest import DTYPES, HIDDEN


@pytest.mark.parametrize("rows", [1, 3, 256])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_output_matches_reference(llvm_library, dtype, hidden, rows):
    rng = np.random.default_rng()
    results = check_variant(llvm_library, hidden, dtype, rows, rng)
    assert {r.op for r in results} == {"forward", "forward_stats", "backward"}
    assert len(results) == 8
    bad = [f"{r.op}.{r.output}: {r.error:.2e} > {r.tolerance:.0e}" for r in results if not r.ok]
    assert not bad, bad


def test_check_detects_a_wrong_kernel(llvm_library):
    """The comparison can fail: a kernel of another hidden size's library entry is caught."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 128)).astype(np.float32) + 3
    y, mean, rstd = llvm_library.forward(x, np.ones(128, np.float32), np.zeros(128, np.float32))
    wrong_y = y.copy()
    wrong_y[2, 5] += 0.1
    ref_y = reference.forward(x, np.ones(128), np.zeros(128), 1e-5)[0]
    assert reference.rel_error(y, ref_y) < reference.TOLERANCE["float32"]
    assert reference.rel_error(wrong_y, ref_y) > reference.TOLERANCE["float32"]


def test_large_offset_rows_keep_their_variance(llvm_library):
    """1e4 ± 1 data: the two-pass variance stays accurate where E[x²] − E[x]² loses every digit."""
    rng = np.random.default_rng()
    x = (1e4 + rng.standard_normal((64, 4096))).astype(np.float32)
    mean, rstd = llvm_library.forward_stats(x)
    ref_mean, ref_rstd = reference.forward_stats(x, 1e-5)
    # float32 sums of 4096 values near 1e4 err ~1e-6 (1.15e-6 worst of 300 seeds); dropping one
    # element of a row errs 2.4e-4, so 1e-5 still catches a missed element.
    assert reference.rel_error(mean, ref_mean) < 1e-5
    assert reference.rel_error(rstd, ref_rstd) < 1e-3
    naive_var = (x * x).mean(1) - x.mean(1) ** 2
    assert reference.rel_error(1 / np.sqrt(np.maximum(naive_var, 0) + 1e-5), ref_rstd) > 1e-1


def test_backward_is_deterministic(llvm_library):
    rng = np.random.default_rng()
    x, dy = (rng.standard_normal((300, 768)).astype(np.float32) + 2 for _ in range(2))
    gamma = rng.standard_normal(768).astype(np.float32)
    _, mean, rstd = llvm_library.forward(x, gamma, gamma)
    first = llvm_library.backward(dy, x, mean, rstd, gamma)
    second = llvm_library.backward(dy, x, mean, rstd, gamma)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)
