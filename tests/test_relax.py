"""lntune.relax: layer_norm legalized to lntune's scheduled PrimFunc, and the emitted backward."""

import numpy as np
import pytest
import tvm
from tvm import relax

from lntune.relax import build, emit_layer_norm_backward, legalize_layer_norm
from te_ops import reference


def _model(shape=(2, 3, 64), hidden=64, out=16):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    g, b = (relax.Var(n, relax.TensorType((hidden,), "float32")) for n in ("g", "b"))
    w = relax.Var("w", relax.TensorType((hidden, out), "float32"))
    with bb.function("main", [x, g, b, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.layer_norm(x, g, b, axes=[-1], epsilon=1e-5))
            result = bb.emit_output(relax.op.matmul(y, w))
        bb.emit_func_output(result)
    return bb.get()


def test_layer_norm_then_matmul_matches_numpy():
    mod = legalize_layer_norm(_model(), "llvm")
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert "lntune_forward_float32_n64" in prims, list(prims)
    assert prims["lntune_forward_float32_n64"].attrs["tir.is_scheduled"]
    assert "R.nn.layer_norm" not in mod["main"].script() and "R.call_tir" in mod["main"].script()
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    rng = np.random.default_rng()
    x = (rng.standard_normal((2, 3, 64)) + 3).astype("float32")
    g, b = (rng.standard_normal(64).astype("float32") for _ in range(2))
    w = rng.standard_normal((64, 16)).astype("float32")
    got = vm["main"](*[tvm.runtime.tensor(a) for a in (x, g, b, w)]).numpy()
    want = reference.forward(x.reshape(6, 64), g, b, 1e-5)[0].reshape(2, 3, 64) @ w
    assert reference.rel_error(got, want) < 1e-5


def test_legalized_module_builds_for_cuda():
    mod = legalize_layer_norm(_model(hidden=1024, shape=(4, 1024)), "cuda-sm90")
    lib = tvm.compile(
        mod,
        target=tvm.target.Target(
            {
                "kind": "cuda",
                "arch": "sm_90",
                "max_threads_per_block": 1024,
                "max_shared_memory_per_block": 49152,
                "thread_warp_size": 32,
            },
            host="llvm",
        ),
    )
    assert lib is not None


def test_unsupported_layer_norm_is_left_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "float64"))
    g, b = (relax.Var(n, relax.TensorType((64,), "float64")) for n in ("g", "b"))
    with bb.function("main", [x, g, b]):
        bb.emit_func_output(relax.op.nn.layer_norm(x, g, b, axes=[-1]))
    assert "R.nn.layer_norm" in legalize_layer_norm(bb.get(), "llvm")["main"].script()


def test_lntunes_build_rewrites_the_cuda_source_and_a_plain_compile_does_not():
    """lntune.relax.build: the legalized bfloat16 forward comes out with lntune's CUDA source rewrites
    (conversions in round-to-nearest pairs); a plain tvm.compile, outside lntune's builds, gets TVM's
    source unchanged."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 1024), "bfloat16"))
    g, b = (relax.Var(n, relax.TensorType((1024,), "bfloat16")) for n in ("g", "b"))
    with bb.function("main", [x, g, b]):
        bb.emit_func_output(relax.op.nn.layer_norm(x, g, b, axes=[-1]))
    mod = legalize_layer_norm(bb.get(), "cuda-sm90")

    def cuda_source(lib):
        return "".join(m.inspect_source() for m in lib.mod._collect_from_import_tree(lambda m: m.kind == "cuda"))

    assert "__floats2bfloat162_rn(" in cuda_source(build(mod, "cuda-sm90"))
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_threads_per_block": 1024}, host="llvm")
    assert "__floats2bfloat162_rn(" not in cuda_source(tvm.compile(mod, target=target))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emitted_backward_matches_reference(dtype):
    rows, hidden = 37, 128
    bb = relax.BlockBuilder()
    t = relax.TensorType
    dy, x = relax.Var("dy", t((rows, hidden), dtype)), relax.Var("x", t((rows, hidden), dtype))
    mean, rstd = relax.Var("mean", t((rows,), "float32")), relax.Var("rstd", t((rows,), "float32"))
    gamma = relax.Var("gamma", t((hidden,), dtype))
    with bb.function("grad", [dy, x, mean, rstd, gamma]):
        bb.emit_func_output(emit_layer_norm_backward(bb, dy, x, mean, rstd, gamma, "llvm"))
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())
    rng = np.random.default_rng()
    np_dtype = np.float32 if dtype == "float32" else __import__("ml_dtypes").bfloat16
    xs = (rng.standard_normal((rows, hidden)) + 2).astype(np_dtype)
    dys, gs = rng.standard_normal((rows, hidden)).astype(np_dtype), rng.standard_normal(hidden).astype(np_dtype)
    m, r = (v.astype(np.float32) for v in reference.forward_stats(xs, 1e-5))
    got = vm["grad"](*[tvm.runtime.tensor(a) for a in (dys, xs, m, r, gs)])
    for out, want in zip(got, reference.backward(dys, xs, m, r, gs)):
        assert reference.rel_error(out.numpy(), want) < reference.TOLERANCE[dtype]
