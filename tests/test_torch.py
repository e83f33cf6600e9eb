"""lntune.torch against torch.nn.functional.layer_norm: values and gradients, modules, torch.compile."""

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lntune.torch as lt  # noqa: E402
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


# -- the eager fast path, the cache, patch(), compile -------------------------------------------------
def _grads(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


def _reference(x, w, b, eps, dy):
    """torch's layer_norm in float64 on the same values: y and the gradients of x, w, b."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = torch.nn.functional.layer_norm(x64, (x.shape[-1],), w64, b64, eps)
    return (y64, *_grads(y64, (x64, w64, b64), dy.double()))


def test_misaligned_and_strided_views_are_copied_not_crashed(llvm_library):
    """Views 4 bytes off an allocation (weight and bias cut from one flat buffer), a transposed x
    and a stride-0 dy (from .sum().backward()) give torch's results instead of a fault."""
    hidden = 128
    flat = torch.randn(1 + 2 * hidden + 64 * hidden)
    w = flat[1 : hidden + 1]
    b = flat[hidden + 1 : 2 * hidden + 1]
    assert w.data_ptr() % 16 and b.data_ptr() % 16
    x_base = flat[2 * hidden + 1 :].view(64, hidden) + 2
    x = flat[2 * hidden + 1 :].view(64, hidden).detach().requires_grad_()  # misaligned, contiguous
    xt = x_base.t().contiguous().t().detach().requires_grad_()  # column-major: not contiguous
    for inp in (x, xt):
        y = layer_norm(inp, hidden, w, b, 1e-5, library=llvm_library)
        want = torch.nn.functional.layer_norm(inp.detach().double(), (hidden,), w.double(), b.double(), 1e-5)
        assert _rel(y, want) < 1e-5
        (gx,) = torch.autograd.grad(y.sum(), (inp,))  # dy = ones, expanded: stride 0
        x64 = inp.detach().double().requires_grad_()
        (want_gx,) = torch.autograd.grad(
            torch.nn.functional.layer_norm(x64, (hidden,), w.double(), b.double(), 1e-5).sum(), (x64,)
        )
        assert reference.rel_error(gx.double().numpy(), want_gx.numpy()) < 1e-4 or gx.abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_rows_normalize_to_beta_exactly(llvm_library, dtype):
    """Padding rows are constant: y is beta exactly and the gradients are finite, at BERT's eps."""
    hidden = 1000
    x = torch.full((3, hidden), -7.3, dtype=dtype).requires_grad_()
    w = torch.randn(hidden, dtype=dtype).requires_grad_()
    b = torch.randn(hidden, dtype=dtype).requires_grad_()
    y = layer_norm(x, hidden, w, b, 1e-12, library=llvm_library)
    assert torch.equal(y, b.detach().expand_as(y))
    grads = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert all(torch.isfinite(g).all() for g in grads)


def test_numpy_scalars_are_accepted(llvm_library):
    x = torch.randn(5, 128)
    y = layer_norm(x, np.int64(128), eps=np.float32(1e-5), library=llvm_library)
    assert _rel(y, torch.nn.functional.layer_norm(x, (128,), eps=1e-5)) < 1e-5
    assert LayerNorm(np.int64(128), np.float64(1e-5), library=llvm_library)(x).shape == x.shape


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("inf"), 1e-300, 1e39, True])
def test_eps_that_float32_cannot_hold_is_refused(llvm_library, eps):
    with pytest.raises(ValueError, match="eps"):
        layer_norm(torch.randn(2, 128), 128, eps=eps, library=llvm_library)


def test_a_weight_on_another_device_is_refused(llvm_library):
    x, w = torch.randn(4, 128), torch.empty(128, device="meta")
    with pytest.raises(ValueError, match="gamma is on meta, but x is on cpu"):
        layer_norm(x, 128, w, torch.zeros(128), library=llvm_library)


def test_launch_plans_are_cached_per_shape_and_still_checked(llvm_library):
    lib = llvm_library
    x, w, b = torch.randn(611, 128), torch.randn(128), torch.randn(128)
    before = len(lib._plans)
    lib.forward(x, w, b)
    lib.forward(torch.randn(611, 128), w, b)  # same shapes, dtypes, device: the same plan
    assert len(lib._plans) == before + 1
    y, _, _ = lib.forward(torch.randn(613, 128), w, b)  # another M: a plan of its own, and right
    assert len(lib._plans) == before + 2 and y.shape == (613, 128)
    with pytest.raises(ValueError, match=r"gamma must have shape \(128,\)"):
        lib.forward(x, w[:64], b)  # a known x shape with a wrong gamma is checked again
    with pytest.raises(ValueError, match="gamma must have dtype float32"):
        lib.forward(x, w.double(), b)


def test_patch_replaces_layer_norms_and_keeps_their_parameters(llvm_library):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 128), torch.nn.LayerNorm(128), torch.nn.Sequential(torch.nn.LayerNorm(128, eps=1e-6))
    )
    reference_model = copy.deepcopy(model)
    weight = model[1].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lt.patch(model, library=llvm_library)
    assert isinstance(model[1], LayerNorm) and isinstance(model[2][0], LayerNorm)
    assert model[1].weight is weight and model[2][0].eps == 1e-6
    x, target = torch.randn(8, 128), torch.randn(8, 128)
    for m in (model, reference_model):
        (m(x) * target).sum().backward()
    assert _rel(model(x), reference_model(x)) < 1e-5
    assert _rel(model[2][0].weight.grad, reference_model[2][0].weight.grad) < 1e-4
    optimizer.step()  # the optimizer still holds the parameters the patched layers use
    assert not torch.equal(model[1].weight, reference_model[1].weight)


def test_compile_with_inductor_does_not_recompile_per_row_count(llvm_library):
    """fullgraph=True with the default backend; after dynamo marks M dynamic, new M reuse the graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = LayerNorm(128, library=llvm_library)
    compiled = torch.compile(module, fullgraph=True)
    for rows in (5, 9, 33, 70):
        x = (torch.randn(rows, 128) + 2).requires_grad_()
        dy = torch.randn(rows, 128)
        y = compiled(x)
        (gx,) = torch.autograd.grad(y, (x,), dy)
        want = _reference(x, module.weight, module.bias, 1e-5, dy)
        assert _rel(y, want[0]) < 1e-5 and _rel(gx, want[1]) < 1e-4
    assert counters["stats"]["unique_graphs"] <= 2


def test_cache_builds_once_and_reuses(tmp_path, monkeypatch):
    """Without library=, a variant is exported into $LNTUNE_CACHE on first use, then loaded."""
    from lntune import build, cache

    monkeypatch.setenv("LNTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lt, "_CHOSEN", {})
    monkeypatch.setattr(cache, "_LOADED", {})
    x = torch.randn(3, 24) + 1
    y = LayerNorm(24)(x)  # torch.nn.LayerNorm's positional arguments, no library
    assert _rel(y, torch.nn.functional.layer_norm(x, (24,))) < 1e-5
    built = list(tmp_path.glob("*/n24-float32/manifest.json"))
    assert len(built) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("a cached variant was exported again")

    monkeypatch.setattr(build, "export", no_export)
    monkeypatch.setattr(lt, "_CHOSEN", {})
    monkeypatch.setattr(cache, "_LOADED", {})
    assert _rel(LayerNorm(24)(x), y) == 0


def test_two_processes_building_one_variant_share_the_cache(tmp_path):
    """Both succeed and the entry is built once (the second waits for the first's lock)."""
    import subprocess
    import sys

    script = (
        "import torch, lntune.torch as lt; x = torch.randn(4, 40) + 1; "
        "y = lt.layer_norm(x, 40); "
        "assert (y - torch.nn.functional.layer_norm(x, (40,))).abs().max() < 1e-5; print('ok')"
    )
    env = {**os.environ, "LNTUNE_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    assert sum("lntune: built" in err for _, err in outs) == 1
    assert len(list(tmp_path.glob("*/n40-float32/lntune.so"))) == 1
    assert not list(tmp_path.glob("*/*.tmp*"))  # no half-written folder left behind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_input_with_float32_parameters(dtype):
    """AMP / master weights: y and dx in x's dtype, dweight and dbias in float32, from one mixed
    kernel each (the cache exports the bfloat16:float32 variant), against float64."""
    hidden = 200
    module = LayerNorm(hidden)  # float32 parameters
    with torch.no_grad():
        module.weight.normal_(1.0, 0.5)
        module.bias.normal_()
    x = (torch.randn(37, hidden) * 2 + 5).to(dtype).requires_grad_()
    dy = torch.randn(37, hidden).to(dtype)
    y = module(x)
    gx, gw, gb = torch.autograd.grad(y, (x, module.weight, module.bias), dy)
    want = _reference(x, module.weight, module.bias, 1e-5, dy)
    assert (y.dtype, gx.dtype, gw.dtype, gb.dtype) == (dtype, dtype, torch.float32, torch.float32)
    assert _rel(y, want[0]) < TOLERANCE[dtype] and _rel(gx, want[1]) < TOLERANCE[dtype]
    # dy is exact in float32 and the sums accumulate in float32: float32 accuracy for the parameters.
    assert _rel(gw, want[2]) < 3e-5 and _rel(gb, want[3]) < 3e-5
    assert lt.library_for("cpu", hidden, dtype, torch.float32).has_variant(hidden, str(dtype)[6:], "float32")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_on_cpu_gives_what_torch_gives(x_dtype):
    """Under CPU autocast torch leaves layer_norm alone (fp32 stays fp32, bf16 with fp32 weights
    stays bf16); lntune's module gives the same dtype and values within the dtype's tolerance."""
    ours, theirs = LayerNorm(96), torch.nn.LayerNorm(96)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.load_state_dict(ours.state_dict())
    x = (torch.randn(8, 96) + 1).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = ours(x), theirs(x)
        linear_then_norm = ours(torch.nn.Linear(96, 96)(x.float()))  # autocast makes the Linear bf16
    assert y.dtype == want.dtype == x_dtype
    assert _rel(y, want) < TOLERANCE[x_dtype]
    assert linear_then_norm.dtype == torch.bfloat16


def test_mixed_dtypes_lntune_has_no_kernel_for_fall_back_or_raise(llvm_library):
    x, w = torch.randn(4, 128), torch.randn(128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 input with bfloat16 parameters"):
        layer_norm(x, 128, w, None, library=llvm_library)
    with pytest.raises(ValueError, match="float64"):
        layer_norm(x.double(), 128, library=llvm_library)
    with pytest.warns(UserWarning, match="using torch's layer_norm"):
        y = layer_norm(x.double(), 128, library=llvm_library, fallback=True)
    assert y.dtype == torch.float64
    with pytest.raises(ValueError, match="weight in torch.float32 but bias in torch.bfloat16"):
        layer_norm(x, 128, torch.ones(128), torch.zeros(128, dtype=torch.bfloat16), library=llvm_library)


def test_a_variant_rebuilt_in_the_cache_loads_anew(tmp_path, monkeypatch):
    """A damaged cache entry is exported again and the new library is what runs, in the same process."""
    from lntune import cache

    monkeypatch.setenv("LNTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(lt, "_CHOSEN", {})
    monkeypatch.setattr(cache, "_LOADED", {})
    x = torch.randn(3, 56) + 1
    first = LayerNorm(56)(x)
    (manifest,) = tmp_path.glob("*/n56-float32/manifest.json")
    library = manifest.with_name("lntune.so")
    # Cut short in a new file renamed over it: truncating the file this process has mapped would
    # fault the process (SIGBUS), which is what renames prevent in real exports.
    cut = library.with_name("cut.so")
    cut.write_bytes(library.read_bytes()[:4096])
    os.replace(cut, library)  # read_manifest refuses it
    monkeypatch.setattr(lt, "_CHOSEN", {})
    monkeypatch.setattr(lt, "_EAGER", {})
    monkeypatch.setattr(cache, "_LOADED", {})
    assert torch.equal(LayerNorm(56)(x), first)
    assert library.stat().st_size > 4096


def test_eager_calls_are_checked_once_per_input_kind_and_again_when_it_changes(llvm_library, monkeypatch):
    """The checks of an eager call are kept under its input's shape, dtype and device and its
    parameters': a repeated call reuses them; a new row count, a module moved to another dtype or a
    parameter swapped for one of the wrong shape is checked anew (and refused where wrong)."""
    monkeypatch.setattr(lt, "_EAGER", {})
    ours = LayerNorm(128, library=llvm_library)
    x = torch.randn(9, 128)
    ours(x)
    ours(torch.randn(9, 128))
    assert len(lt._EAGER) == 1
    ours(torch.randn(2, 5, 128))
    assert len(lt._EAGER) == 2
    ours.to(torch.bfloat16)
    y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16 and len(lt._EAGER) == 3
    assert _rel(y, torch.nn.functional.layer_norm(x.double(), (128,))) < TOLERANCE[torch.bfloat16]
    ours.weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="gamma must have shape"):
        ours(x.bfloat16())


@pytest.mark.parametrize("shape", [(6, 128), (2, 3, 128)])
def test_autograd_records_one_node_and_the_output_can_be_changed_in_place(llvm_library, shape):
    """x keeps its shape through the call (no view nodes in the graph, which cost host time in every
    backward), and y is a tensor of its own: modifying it in place works as with torch's."""
    x = (torch.randn(shape) + 1).requires_grad_()
    ours, theirs = LayerNorm(128, library=llvm_library), torch.nn.LayerNorm(128)
    y = ours(x)
    assert type(y.grad_fn).__name__ == "_LayerNormFunctionBackward"
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    y.mul_(2).add_(1)
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    x64 = x.detach().double().requires_grad_()
    want = theirs.double()(x64).mul(2).add(1)
    (want_gx,) = torch.autograd.grad(want.sum(), (x64,))
    assert _rel(y, want) < 1e-5
    assert reference.rel_error(gx.double().numpy(), want_gx.numpy()) < 1e-4 or gx.abs().max() < 1e-4


def test_multi_axis_parameters_get_gradients_of_their_shape(llvm_library):
    x = (torch.randn(5, 4, 32) + 2).requires_grad_()
    ours, theirs = LayerNorm((4, 32), library=llvm_library), torch.nn.LayerNorm((4, 32))
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
        theirs.load_state_dict(ours.state_dict())
    dy = torch.randn_like(x)
    ours(x).backward(dy)
    x_grad, x.grad = x.grad, None
    theirs(x).backward(dy)
    assert ours.weight.grad.shape == (4, 32) and ours.bias.grad.shape == (4, 32)
    assert _rel(x_grad, x.grad) < 1e-4
    assert _rel(ours.weight.grad, theirs.weight.grad) < 1e-5
    assert _rel(ours.bias.grad, theirs.bias.grad) < 1e-5


def test_second_derivatives_raise_instead_of_being_wrong(llvm_library):
    """create_graph=True gives the first derivatives; asking for derivatives of them through
    lntune's backward (which is not differentiable) raises rather than treating them as constants."""
    x = (torch.randn(4, 128) + 1).requires_grad_()
    ours = LayerNorm(128, library=llvm_library)
    c = torch.randn(4, 128)
    (gx,) = torch.autograd.grad(((ours(x) * c) ** 2).sum(), (x,), create_graph=True)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(((torch.nn.functional.layer_norm(x64, (128,)) * c.double()) ** 2).sum(), (x64,))
    assert _rel(gx, want) < 1e-4
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
