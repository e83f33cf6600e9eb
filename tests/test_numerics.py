"""The forward's statistics: exact for rows of one value, at least torch's accuracy far from zero, and
built so that no compiler's float32 shortcuts reach them (te_ops' _row_moments and _over_n)."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from lntune.build import kernel_library, kernel_source
from lntune.runner import numpy_dtype
from schedules.targets import get_target
from te_ops import reference
from te_ops.layer_norm import Kernel

from .conftest import DTYPES

torch = pytest.importorskip("torch")

CONSTANT_HIDDEN = (1, 7, 1000, 4096)  # all in conftest.HIDDEN
CONSTANTS = (-7.3, 1e4, 3.0)
BERT_EPS = 1e-12


@pytest.mark.parametrize("hidden", CONSTANT_HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_one_value_normalize_to_beta_exactly(llvm_library, dtype, hidden):
    """x - mean is exactly 0 for a row of one value, so y is beta bit for bit at BERT's eps, where
    rstd is 1e6: a mean off by one unit in the last place gave |y - beta| ~ 1 (float32 -7.3, N = 1000)."""
    rng = np.random.default_rng()
    np_dtype = numpy_dtype(dtype)
    x = np.repeat(np.array(CONSTANTS * 2)[:, None], hidden, axis=1).astype(np_dtype)
    gamma = (1 + 0.5 * rng.standard_normal(hidden)).astype(np_dtype)
    beta = rng.standard_normal(hidden).astype(np_dtype)
    y, mean, rstd = llvm_library.forward(x, gamma, beta, eps=BERT_EPS)
    assert np.array_equal(y.astype(np.float64), np.broadcast_to(beta.astype(np.float64), y.shape))
    assert np.array_equal(mean, x[:, 0].astype(np.float32))
    assert np.all(np.isfinite(rstd)) and np.all(rstd > 0)
    stats_mean, stats_rstd = llvm_library.forward_stats(x, eps=BERT_EPS)
    assert np.array_equal(stats_mean, mean) and np.array_equal(stats_rstd, rstd)
    y0, _, _ = llvm_library.forward(x, gamma, np.zeros_like(beta), eps=BERT_EPS)
    assert not np.any(y0.astype(np.float64))


def _torch_errors(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, want) -> list[float]:
    as_torch = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype = as_torch["bfloat16" if x.dtype.name == "bfloat16" else x.dtype.name]
    tx, tg, tb = (torch.from_numpy(a.astype(np.float32)).to(dtype) for a in (x, gamma, beta))
    y, mean, rstd = torch.ops.aten.native_layer_norm(tx, (x.shape[1],), tg, tb, eps)
    got = (y.float().numpy(), mean.float().numpy().ravel(), rstd.float().numpy().ravel())
    return [reference.rel_error(g, w) for g, w in zip(got, want)]


OFFSET_ROWS = [("float32", 1e4, 1000), ("float32", 1e4, 4096), ("bfloat16", 1e3, 1000), ("float16", 1e3, 1000)]


@pytest.mark.parametrize("dtype,offset,hidden", OFFSET_ROWS)
def test_rows_far_from_zero_are_at_least_as_accurate_as_torch(llvm_library, dtype, offset, hidden):
    """float32 1e4 +- 1 and 16-bit 1e3 +- 1: mean, rstd and y against float64, no worse than torch's
    CPU layer_norm on the same rounded input (measured: float32 y 2.3e-4 against torch's 4.5e-4,
    rstd 7e-7 against 4e-5; the two-pass statistics before gave y 3.3e-3)."""
    rng = np.random.default_rng()
    np_dtype = numpy_dtype(dtype)
    x = (offset + rng.standard_normal((64, hidden))).astype(np_dtype)
    gamma = (1 + 0.5 * rng.standard_normal(hidden)).astype(np_dtype)
    beta = rng.standard_normal(hidden).astype(np_dtype)
    want = reference.forward(x, gamma, beta, 1e-5)
    ours = [reference.rel_error(g, w) for g, w in zip(llvm_library.forward(x, gamma, beta, eps=1e-5), want)]
    theirs = _torch_errors(x, gamma, beta, 1e-5, want)
    # 16-bit y is rounded to its dtype by both, so the two errors agree to a few parts in a thousand.
    for name, a, b in zip(("y", "mean", "rstd"), ours, theirs):
        assert a <= 1.05 * b + 1e-7, f"{name}: lntune {a:.2e}, torch {b:.2e}"


def test_llvm_statistics_take_float64_products_and_no_fast_math():
    """sum(d) / N and sum(d**2) / N go through float64 (fpext, fmul double, fptrunc), and no float
    operation of the forward carries a fast-math flag (reassociation, reciprocals, contraction)."""
    ir = kernel_library(Kernel("forward", 1000, "float32"), get_target("llvm")).mod.inspect_source("ll")
    assert re.search(r"fmul (<\d+ x )?double", ir) and "fptrunc" in ir
    assert not re.findall(r"\b(fast|reassoc|arcp|contract|afn|nnan|ninf|nsz)\b", ir)


def test_cuda_statistics_survive_fast_math():
    """TVM compiles CUDA with --use_fast_math (approximate float32 division, flush to zero): the
    row's terms are float64 products, which it leaves alone (mul.rn.f64 in nvcc's PTX)."""
    source = kernel_source(Kernel("forward", 5120, "bfloat16"), get_target("cuda-sm90"))
    # 1/5120 = 0.0001953125 exactly: TVM prints float64 constants with 15 decimals (OVER_N_PRODUCT_LIMIT)
    products = re.findall(r"\(\(double\)\(\(volatile float\*\)red_result\w*\)\[0\]\) \* 0\.000195312500000\)", source)
    assert len(products) == 2, "sum(d) / N and sum(d**2) / N, once a row"
    if not shutil.which("nvcc"):
        pytest.skip("needs nvcc")
    ptx = subprocess.run(
        ["nvcc", "-ptx", "-arch=sm_90", "-O3", "--use_fast_math", "-w", "-x", "cu", "-", "-o", "-"],
        input=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert len(re.findall(r"\bmul(\.rn)?\.f64", ptx)) == 2 and len(re.findall(r"cvt\.rn(\.ftz)?\.f32\.f64", ptx)) == 2
    assert not re.search(r"div\.(approx|full)\.f32|rcp\.approx", ptx)
