"""The runner's API: kinds of input, M = 0, and clear errors before any kernel runs."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lntune
from te_ops import reference


def _inputs(rows=5, hidden=128, dtype=np.float32):
    rng = np.random.default_rng()
    x = (rng.standard_normal((rows, hidden)) + 1).astype(dtype)
    gamma, beta = (rng.standard_normal(hidden).astype(dtype) for _ in range(2))
    return x, gamma, beta


def test_load_accepts_directory_or_library_file(llvm_library):
    again = lntune.load(llvm_library.directory / "lntune.so")
    assert again.variants == llvm_library.variants


def test_load_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="lntune export"):
        lntune.load(tmp_path)


def test_numpy_in_numpy_out_bfloat16(llvm_library):
    x, gamma, beta = _inputs(dtype=ml_dtypes.bfloat16)
    y, mean, rstd = llvm_library.forward(x, gamma, beta)
    assert isinstance(y, np.ndarray) and y.dtype == ml_dtypes.bfloat16 and mean.dtype == np.float32
    assert reference.rel_error(y, reference.forward(x, gamma, beta, 1e-5)[0]) < reference.TOLERANCE["bfloat16"]


def test_zero_rows_return_empty_outputs(llvm_library):
    x, gamma, beta = _inputs(rows=0)
    y, mean, rstd = llvm_library.forward(x, gamma, beta)
    assert y.shape == (0, 128) and mean.shape == (0,) and rstd.shape == (0,)
    mean, rstd = llvm_library.forward_stats(x)
    assert mean.shape == (0,)
    dx, dgamma, dbeta = llvm_library.backward(x, x, mean, rstd, gamma)
    assert dx.shape == (0, 128)
    assert np.array_equal(dgamma, np.zeros(128, np.float32)) and np.array_equal(dbeta, np.zeros(128, np.float32))


def test_eps_is_a_runtime_argument(llvm_library):
    x, gamma, beta = _inputs()
    for eps in (1e-5, 0.5):
        _, rstd = llvm_library.forward_stats(x, eps=eps)
        assert reference.rel_error(rstd, reference.forward_stats(x, eps)[1]) < 1e-5


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: {**a, "x": a["x"].astype(np.float64)}, ValueError, "no variant for hidden=128, dtype=float64"),
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "x must be 2-D"),
        (lambda a: {**a, "x": np.zeros((5, 99), np.float32)}, ValueError, "no variant for hidden=99"),
        (lambda a: {**a, "gamma": a["gamma"][:64]}, ValueError, r"gamma must have shape \(128,\)"),
        (lambda a: {**a, "beta": a["beta"].astype(np.float16)}, ValueError, "beta must have dtype float32"),
        (lambda a: {**a, "x": a["x"].tolist()}, TypeError, "x must be a numpy array, torch tensor or tvm tensor"),
        (lambda a: {**a, "eps": 0.0}, ValueError, "eps must be a finite number > 0"),
        (lambda a: {**a, "eps": float("nan")}, ValueError, "eps must be a finite number > 0"),
        (lambda a: {**a, "eps": 1e-300}, ValueError, "that float32 can hold"),
        (lambda a: {**a, "eps": "1e-5"}, ValueError, "eps must be a real number"),
    ],
)
def test_forward_rejects_bad_input(llvm_library, change, error, message):
    x, gamma, beta = _inputs()
    args = change({"x": x, "gamma": gamma, "beta": beta, "eps": 1e-5})
    with pytest.raises(error, match=message):
        llvm_library.forward(**args)


def test_backward_rejects_wrong_statistics_without_touching_inputs(llvm_library):
    x, gamma, beta = _inputs()
    _, mean, rstd = llvm_library.forward(x, gamma, beta)
    dy = x.copy()
    before = [a.copy() for a in (dy, x, mean, rstd, gamma)]
    with pytest.raises(ValueError, match=r"mean must have shape \(5,\)"):
        llvm_library.backward(dy, x, mean[:4], rstd, gamma)
    with pytest.raises(ValueError, match="rstd must have dtype float32"):
        llvm_library.backward(dy, x, mean, rstd.astype(np.float64), gamma)
    with pytest.raises(ValueError, match=r"dy and x must have one shape, got dy \(5, 128\) and x \(3, 128\)"):
        llvm_library.backward(dy, x[:3], mean, rstd, gamma)
    for a, b in zip(before, (dy, x, mean, rstd, gamma)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("rows", [0, 7])
def test_torch_backward_takes_its_partials_from_torch_not_tvm(llvm_library, monkeypatch, rows):
    """With torch tensors the fp32 partials come from torch's allocator (a TVM allocation is a
    cudaMalloc/cudaFree pair on CUDA, the free waiting for the device, in every backward);
    the results, and the zero-row sum, stay right."""
    torch = pytest.importorskip("torch")
    x, gamma, beta = (torch.from_numpy(a) for a in _inputs(rows=rows))
    y, mean, rstd = llvm_library.forward(x, gamma, beta)
    dy = torch.randn_like(x)

    def no_tvm_allocation(*args, **kwargs):
        raise AssertionError("the torch path allocated through tvm.runtime.empty")

    monkeypatch.setattr(lntune.runner.tvm.runtime, "empty", no_tvm_allocation)
    dx, dgamma, dbeta = llvm_library.backward(dy, x, mean, rstd, gamma)
    want = reference.backward(*(t.numpy() for t in (dy, x, mean, rstd, gamma)))
    for got, expected in zip((dx, dgamma, dbeta), want, strict=True):
        assert isinstance(got, torch.Tensor)
        assert reference.rel_error(got.numpy(), expected) < reference.TOLERANCE["float32"]
    if rows == 0:
        assert not dgamma.any() and not dbeta.any()


def test_any_layout_and_real_scalar_is_accepted(llvm_library):
    """Column-major and strided numpy arrays are copied (not refused, not misread); eps may be any
    real scalar, numpy's included."""
    x, gamma, beta = _inputs(rows=6)
    want = reference.forward(x, gamma, beta, 1e-5)[0]
    for layout in (np.asfortranarray(x), np.repeat(x, 2, axis=1)[:, ::2]):
        assert not layout.flags.c_contiguous
        y, _, _ = llvm_library.forward(layout, gamma, beta, eps=np.float32(1e-5))
        assert reference.rel_error(y, want) < reference.TOLERANCE["float32"]


def test_load_names_what_it_was_given(llvm_library, tmp_path):
    assert lntune.load(llvm_library.directory / "manifest.json").variants == llvm_library.variants
    with pytest.raises(ValueError, match="pass the folder"):
        lntune.load(llvm_library.directory / "other.so")


@settings(max_examples=30, deadline=None)
@given(
    hidden=st.sampled_from([7, 128, 1000]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    rows=st.integers(0, 9),
    offset=st.integers(0, 17),
    layout=st.sampled_from(["contiguous", "transposed", "every_other_row", "every_other_column"]),
)
def test_any_strides_and_offsets_give_the_reference(llvm_library, hidden, dtype, rows, offset, layout):
    """Property: a torch view at any element offset and with any of these strides gives what its
    contiguous values give (copied where the kernels cannot read it in place), forward and backward."""
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    size = 2 * rows * hidden * 2 + 2 * hidden + offset + 8
    flat = (torch.randn(size) + 2).to(tdt)
    gamma, beta = flat[offset : offset + hidden], flat[offset + hidden : offset + 2 * hidden]
    base = flat[offset + 2 * hidden :]
    if layout == "contiguous":
        x = base[: rows * hidden].view(rows, hidden)
    elif layout == "transposed":
        x = base[: rows * hidden].view(hidden, rows).t()
    elif layout == "every_other_row":
        x = base[: 2 * rows * hidden].view(rows, 2 * hidden)[:, :hidden] if rows else base[:0].view(0, hidden)
    else:
        x = base[: 2 * rows * hidden].view(rows, 2 * hidden)[:, ::2] if rows else base[:0].view(0, hidden)
    dy = torch.randn(rows, hidden).to(tdt).t().contiguous().t()  # column-major dy
    y, mean, rstd = llvm_library.forward(x, gamma, beta)
    dx, dgamma, dbeta = llvm_library.backward(dy, x, mean, rstd, gamma)
    as_np = [t.float().numpy() for t in (x, gamma, beta, dy)]
    want_y, want_mean, want_rstd = reference.forward(as_np[0], as_np[1], as_np[2], 1e-5)
    want = reference.backward(as_np[3], as_np[0], mean.numpy(), rstd.numpy(), as_np[1])
    tol = reference.TOLERANCE[dtype]
    assert reference.rel_error(y.float().numpy(), want_y) <= tol
    if rows:
        assert reference.rel_error(mean.numpy(), want_mean) <= 1e-5
    for got, expected in zip((dx, dgamma, dbeta), want):
        assert reference.rel_error(got.float().numpy(), expected) <= tol


def test_torch_and_other_arrays_mixed_are_refused(llvm_library):
    torch = pytest.importorskip("torch")
    x, gamma, beta = _inputs()
    with pytest.raises(TypeError, match="all arguments must be of one kind"):
        llvm_library.forward(torch.from_numpy(x), gamma, beta)
    with pytest.raises(TypeError, match="gamma must be a numpy array, torch tensor or tvm tensor"):
        llvm_library.forward(torch.from_numpy(x), gamma.tolist(), torch.from_numpy(beta))
