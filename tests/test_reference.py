"""The float64 references are themselves checked: gradients against finite differences."""

import numpy as np
import pytest

from te_ops import reference


def _loss(x, gamma, beta, dy, eps):
    y, _, _ = reference.forward(x, gamma, beta, eps)
    return float((y * dy).sum())


@pytest.mark.parametrize("rows,hidden", [(3, 5), (4, 16)])
def test_backward_matches_finite_differences(rows, hidden):
    rng = np.random.default_rng(rows * hidden)
    x = rng.standard_normal((rows, hidden)) * 2 + 1
    gamma, beta = rng.standard_normal(hidden), rng.standard_normal(hidden)
    dy = rng.standard_normal((rows, hidden))
    eps, h = 1e-5, 1e-6
    _, mean, rstd = reference.forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = reference.backward(dy, x, mean, rstd, gamma)

    def numeric(array, index):
        plus, minus = array.copy(), array.copy()
        plus[index] += h
        minus[index] -= h
        args = {"x": x, "gamma": gamma, "beta": beta}
        name = next(k for k, v in args.items() if v is array)
        return (_loss(**{**args, name: plus}, dy=dy, eps=eps) - _loss(**{**args, name: minus}, dy=dy, eps=eps)) / (
            2 * h
        )

    for index in [(0, 0), (rows - 1, hidden - 1), (1, hidden // 2)]:
        assert dx[index] == pytest.approx(numeric(x, index), rel=1e-5, abs=1e-7)
    for j in [0, hidden - 1]:
        assert dgamma[j] == pytest.approx(numeric(gamma, j), rel=1e-5, abs=1e-7)
        assert dbeta[j] == pytest.approx(numeric(beta, j), rel=1e-5, abs=1e-7)


def test_rel_error_flags_non_finite_and_shape():
    assert reference.rel_error(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) == float("inf")
    assert reference.rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    with pytest.raises(ValueError, match="shape"):
        reference.rel_error(np.zeros(3), np.zeros(4))
