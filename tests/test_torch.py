"""lntune.torch against torch.nn.functional.layer_norm: values and gradients, modules, torch.compile."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lntune.torch import LayerNorm, layer_norm  # noqa: E402
from te_ops import reference  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel(got, want):
    return reference.rel_error(got.detach().double().numpy(), want.detach().double().numpy())


@pytest.mark.parametrize("shape", [(7, 128), (2, 3, 768), (1, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_and_gradients_match_torch(llvm_library, shape, dtype):
    hidden = shape[-1]
    x = (torch.randn(shape) + 3).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(hidden)).to(dtype).requires_grad_()
    b = torch.randn(hidden).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    y = layer_norm(x, hidden, w, b, 1e-5, library=llvm_library)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    # The reference: torch's own kernels in float64 on the same inputs.
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = torch.nn.functional.layer_norm(x64, (hidden,), w64, b64, 1e-5)
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert _rel(y, y64) < TOLERANCE[dtype]
    for got, want in zip(grads, grads64):
        assert got.dtype == dtype and _rel(got, want) < TOLERANCE[dtype]


def test_module_is_a_drop_in_for_torch_layernorm(llvm_library):
    ours, theirs = LayerNorm(768, library=llvm_library), torch.nn.LayerNorm(768)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 5, 768) + 2
    dy = torch.randn_like(x)
    ours(x).backward(dy)
    theirs(x).backward(dy)
    assert _rel(ours.weight.grad, theirs.weight.grad) < 1e-5
    assert _rel(ours.bias.grad, theirs.bias.grad) < 1e-5
    assert set(dict(ours.named_parameters())) == {"weight", "bias"}


def test_no_affine_and_multi_axis_normalized_shape(llvm_library):
    x = torch.randn(3, 8, 16) + 1  # normalized over the last two axes: hidden = 128
    ours = LayerNorm((8, 16), elementwise_affine=False, library=llvm_library)
    assert _rel(ours(x), torch.nn.functional.layer_norm(x, (8, 16))) < 1e-5


def test_missing_variant_raises_or_falls_back(llvm_library):
    x = torch.randn(4, 96)
    with pytest.raises(ValueError, match="no variant for hidden=96"):
        layer_norm(x, 96, library=llvm_library)
    with pytest.warns(UserWarning, match="using torch's layer_norm"):
        y = layer_norm(x, 96, library=llvm_library, fallback=True)
    assert _rel(y, torch.nn.functional.layer_norm(x, (96,))) < 1e-6
    with pytest.raises(ValueError, match="normalized_shape"):
        layer_norm(x, 128, library=llvm_library)


def test_torch_compile_traces_the_custom_ops(llvm_library):
    key = str(llvm_library.directory)
    compiled = torch.compile(lambda x, w, b: layer_norm(x, 128, w, b, library=key), backend="aot_eager", fullgraph=True)
    x = (torch.randn(6, 128) + 3).requires_grad_()
    w, b = torch.randn(128, requires_grad=True), torch.randn(128, requires_grad=True)
    y = compiled(x, w, b)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    y_ref = torch.nn.functional.layer_norm(x, (128,), w, b)
    rx, rw, rb = torch.autograd.grad(y_ref, (x, w, b), torch.ones_like(y_ref))
    assert _rel(y, y_ref) < 1e-5 and _rel(gw, rw) < 1e-5 and _rel(gb, rb) < 1e-5
    assert np.isfinite(gx.numpy()).all()


def test_train_tiny_example_runs_and_learns():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "examples/train_tiny.py"), "--steps", "6", "--hidden", "64"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [float(line.split()[4]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert "ms per step" in out.stdout


def test_tensors_on_another_device_are_refused(llvm_library):
    x = torch.empty(4, 128, device="meta")
    w = torch.empty(128, device="meta")
    with pytest.raises(ValueError, match="x is on meta, but this library runs on cpu"):
        llvm_library.forward(x, w, w)
