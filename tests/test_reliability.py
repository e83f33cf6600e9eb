"""Reliability on the CPU: numerics at scale, NaN isolation, int64 indexing, tuning-database locking,
and property-based checks against the float64 reference."""

import re

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schedules.targets import get_target
from schedules.tune import exclusive
from te_ops import reference

from .conftest import DTYPES, HIDDEN


def test_float16_offset_data(llvm_library):
    """1e3 ± 1 in float16: statistics stay accurate (float32 inside), y is as good as fp16 allows."""
    x = (1e3 + np.random.default_rng().standard_normal((64, 768))).astype(np.float16)
    g, b = np.ones(768, np.float16), np.zeros(768, np.float16)
    y, mean, rstd = llvm_library.forward(x, g, b)
    ref_y, ref_mean, ref_rstd = reference.forward(x, g, b, 1e-5)
    assert reference.rel_error(mean, ref_mean) < 1e-6
    assert reference.rel_error(rstd, ref_rstd) < 1e-3
    assert reference.rel_error(y, ref_y) < 2e-2


def test_bfloat16_column_sums_over_a_million_rows(llvm_library):
    """dgamma/dbeta over 2**20 rows in bfloat16 stay within fp32 accumulation error (partials in fp32)."""
    rows, hidden = 1 << 20, 7
    rng = np.random.default_rng()
    x, dy = (rng.standard_normal((rows, hidden)).astype(ml_dtypes.bfloat16) for _ in range(2))
    gamma = np.ones(hidden, ml_dtypes.bfloat16)
    mean, rstd = (v.astype(np.float32) for v in reference.forward_stats(x, 1e-5))
    _, dgamma, dbeta = llvm_library.backward(dy, x, mean, rstd, gamma)
    _, ref_dgamma, ref_dbeta = reference.backward(dy, x, mean, rstd, gamma)
    # bfloat16 rounding of the result (2**-8) dominates; a bfloat16 accumulator would be far off.
    assert reference.rel_error(dgamma, ref_dgamma) < 8e-3
    assert reference.rel_error(dbeta, ref_dbeta) < 8e-3


def test_a_nan_stays_in_its_row_and_column(llvm_library):
    rng = np.random.default_rng()
    x = rng.standard_normal((16, 128)).astype(np.float32) + 1
    dy = rng.standard_normal((16, 128)).astype(np.float32)
    g, b = np.ones(128, np.float32), np.zeros(128, np.float32)
    x[3, 5] = np.nan
    y, mean, rstd = llvm_library.forward(x, g, b)
    bad_rows = ~np.isfinite(y).all(axis=1)
    assert bad_rows.tolist() == [i == 3 for i in range(16)]
    x[3, 5] = 0.0
    y, mean, rstd = llvm_library.forward(x, g, b)
    dy[7, 9] = np.inf
    dx, dgamma, dbeta = llvm_library.backward(dy, x, mean, rstd, g)
    assert (~np.isfinite(dx).all(axis=1)).tolist() == [i == 7 for i in range(16)]
    assert (~np.isfinite(dgamma)).nonzero()[0].tolist() == [9]
    assert (~np.isfinite(dbeta)).nonzero()[0].tolist() == [9]


def test_cuda_index_arithmetic_is_int64_for_rows_int32_within_a_row():
    """M·N can pass 2**31: offsets that involve the row are int64; lane offsets within a row are int.
    (The CUDA source of the module export compiles; the library holds its cubin.)"""
    import tvm

    from lntune.build import device_source, kernels_for
    from schedules import database

    target = get_target("cuda-sm90")
    kernels = kernels_for(8192, "float16", target)
    funcs = {k.name: database.scheduled(k, target, database.choose(k, target).knobs) for k in kernels}
    source = device_source(tvm.IRModule(funcs), target)
    loads = re.findall(r"x_ptr \+ \(([^;]*)\)\)", source)
    assert loads and all("(int64_t)blockIdx.x" in expr for expr in loads)
    assert re.search(r"\(\(int\)threadIdx\.x\)", source)
    assert "int64_t M" in source  # the row count itself is a 64-bit kernel argument


def test_a_second_tuning_run_on_one_database_is_refused(tmp_path):
    with exclusive(tmp_path):
        with pytest.raises(RuntimeError, match="being tuned by another process"):
            with exclusive(tmp_path):
                pass
    with exclusive(tmp_path):  # released: usable again
        pass


@settings(max_examples=25, deadline=None)
@given(
    hidden=st.sampled_from(HIDDEN),
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(min_value=0, max_value=300),
    offset=st.floats(min_value=-50, max_value=50),
    scale=st.floats(min_value=0.1, max_value=10),
    eps=st.floats(min_value=1e-6, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_forward_and_backward_properties(llvm_library, hidden, dtype, rows, offset, scale, eps, seed):
    rng = np.random.default_rng(seed)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x = (offset + scale * rng.standard_normal((rows, hidden))).astype(np_dtype)
    g, b = (rng.standard_normal(hidden).astype(np_dtype) for _ in range(2))
    dy = rng.standard_normal((rows, hidden)).astype(np_dtype)
    y, mean, rstd = llvm_library.forward(x, g, b, eps=eps)
    assert y.shape == x.shape and mean.shape == (rows,)
    if rows == 0:
        return
    ref_y, ref_mean, ref_rstd = reference.forward(x, g, b, eps)
    tol = reference.TOLERANCE[dtype]
    # The CPU kernel sums a row serially in float32: the mean's rounding error grows like
    # sqrt(N) * 2**-24 * |offset|, and y's relative error like that over the std (fp32 only; the
    # 16-bit tolerances are far above it). Twice that random-walk estimate is the allowance.
    walk = 2 * np.sqrt(hidden) * 2.0**-24 * (abs(offset) / scale + 1)
    y_tol = max(tol, walk if dtype == "float32" else 0)
    assert reference.rel_error(y, ref_y) < max(y_tol, tol)
    assert reference.rel_error(rstd, ref_rstd) < 1e-4
    dx, dgamma, dbeta = llvm_library.backward(dy, x, mean, rstd, g)
    ref = reference.backward(dy, x, mean, rstd, g)
    for got, want in zip((dx, dgamma, dbeta), ref):
        assert reference.rel_error(got, want) < tol


def test_cuda_target_facts_reach_the_schedules():
    cuda = get_target("cuda-sm90")
    assert cuda.spec["max_threads_per_block"] == 1024 and cuda.spec["thread_warp_size"] == 32
    assert get_target("rocm-gfx942").warp == 64
