"""float64 numpy references for every LayerNorm output; tests, `lntune check` and benchmarks use these."""

from __future__ import annotations

import numpy as np


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def forward_stats(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Row mean and 1/sqrt(biased variance + eps)."""
    x = _f64(x)
    mean = x.mean(axis=1)
    var = ((x - mean[:, None]) ** 2).mean(axis=1)
    return mean, 1.0 / np.sqrt(var + eps)


def forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float):
    """y, mean, rstd."""
    mean, rstd = forward_stats(x, eps)
    y = (_f64(x) - mean[:, None]) * rstd[:, None] * _f64(gamma) + _f64(beta)
    return y, mean, rstd


def backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, rstd: np.ndarray, gamma: np.ndarray):
    """dx, dgamma, dbeta given the saved mean and rstd."""
    dy, x, mean, rstd, gamma = map(_f64, (dy, x, mean, rstd, gamma))
    n = x.shape[1]
    xhat = (x - mean[:, None]) * rstd[:, None]
    dyg = dy * gamma
    c1 = (dyg * xhat).sum(axis=1, keepdims=True) / n
    c2 = dyg.sum(axis=1, keepdims=True) / n
    dx = rstd[:, None] * (dyg - xhat * c1 - c2)
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| in float64 (absolute norm when want is all zeros)."""
    got, want = _f64(got), _f64(want)
    if got.shape != want.shape:
        raise ValueError(f"shape mismatch: got {got.shape}, want {want.shape}")
    if not np.all(np.isfinite(got)):
        return float("inf")
    scale = np.linalg.norm(want)
    diff = np.linalg.norm(got - want)
    return float(diff / scale) if scale > 0 else float(diff)


# Relative-norm tolerances per dtype: float32 accumulates in float32; 16-bit outputs are rounded once.
# float32: a single row's rstd (one value, so its relative error is the norm's) from N = 4096 float32
# terms measured 1.26e-5 once in CI-like runs (rounding of the sums); wrong formulas give >= 1e-3.
TOLERANCE = {"float32": 3e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
