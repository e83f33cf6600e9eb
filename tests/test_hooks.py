"""lntune changes TVM only inside its own builds (schedules.hooks), and a kernel that asks for a CUDA
source rewrite gets it or an error naming both (schedules.cuda_source.rewrite_source)."""

from __future__ import annotations

import threading

import pytest
import tvm
import tvm_ffi
from tvm import te
from tvm.backend.cuda.codegen.registry import CODEGEN_REGISTRY
from tvm.tirx.compilation_pipeline import PIPELINE_MAP

from lntune.build import PASS_CONFIG, kernel_source
from schedules import cluster, cuda_source, database, hooks, pipeline
from schedules.targets import get_target
from te_ops.layer_norm import Kernel

SM90 = get_target("cuda-sm90")
PAIRS = "__floats2bfloat162_rn("


def _plain_cuda_source() -> str:
    """A CUDA kernel of this test's own, built with plain tvm.compile: float32 -> bfloat16 in vectors of
    4, which TVM writes as four element casts (what lntune's pack_conversions rewrites)."""
    n = 4096
    a = te.placeholder((n,), name="A")
    b = te.compute((n,), lambda i: a[i].astype("bfloat16"), name="B")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (i,) = sch.get_loops(sch.get_sblock("B"))
    bx, tx, v = sch.split(i, [None, 128, 4])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(v)
    lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host="llvm"))
    return lib.mod.imports[0].inspect_source()


def _tvm_state() -> tuple:
    """What lntune's hooks replace while installed: the post-processor, the compile callback (as the
    handles registered, or None), the TIR pipeline entry and the cp.async codegen entries."""
    funcs = [tvm_ffi.get_global_func(n, allow_missing=True) for n in (cuda_source.POSTPROC, hooks.COMPILE)]
    return (
        funcs,
        PIPELINE_MAP.get(pipeline.PIPELINE),
        {op: CODEGEN_REGISTRY.get(op) for op in hooks.CP_ASYNC_OPS},
    )


def _same_state(a: tuple, b: tuple) -> bool:
    (fa, pa, ca), (fb, pb, cb) = a, b
    funcs = all((x is None and y is None) or (x is not None and y is not None and x.same_as(y)) for x, y in zip(fa, fb))
    return funcs and pa is pb and ca == cb


def test_a_plain_tvm_build_after_lntune_builds_gets_tvms_unmodified_source():
    before, plain = _tvm_state(), _plain_cuda_source()
    assert PAIRS not in plain and ".x = (nv_bfloat16)(" in plain
    assert PAIRS in kernel_source(Kernel("forward", 1024, "bfloat16"), SM90)  # an lntune build: rewritten
    assert _plain_cuda_source() == plain  # then a plain one: TVM's source
    assert _same_state(_tvm_state(), before)
    assert tvm_ffi.get_global_func(cuda_source.POSTPROC, allow_missing=True) is None  # none before, none after
    assert pipeline.PIPELINE not in PIPELINE_MAP
    assert PAIRS in kernel_source(Kernel("forward", 1024, "bfloat16"), SM90)  # and lntune's still rewritten
    with hooks.installed(SM90):  # the hooks are what rewrite it
        assert PAIRS in _plain_cuda_source()


def test_a_post_processor_of_ones_own_is_chained_inside_and_kept_after():
    @tvm_ffi.register_global_func(cuda_source.POSTPROC, override=True)
    def mine(code, target):
        return code + "\n// mine\n"

    try:
        before = _tvm_state()
        built = kernel_source(Kernel("forward", 1024, "bfloat16"), SM90)
        assert "// mine" in built and PAIRS in built
        plain = _plain_cuda_source()
        assert "// mine" in plain and PAIRS not in plain
        assert _same_state(_tvm_state(), before)
    finally:
        tvm_ffi.remove_global_func(cuda_source.POSTPROC)


def test_blocks_nest_and_a_thread_outside_them_gets_tvms_behaviour():
    plain = _plain_cuda_source()
    with hooks.installed(SM90):
        with hooks.installed(SM90):
            assert hooks.active()
        assert hooks.active() and pipeline.PIPELINE in PIPELINE_MAP  # the outer block still holds them
        seen = []
        thread = threading.Thread(target=lambda: seen.append((hooks.active(), _plain_cuda_source())))
        thread.start()
        thread.join()
        assert seen == [(False, plain)]
        assert PAIRS in _plain_cuda_source()
    assert not hooks.active() and pipeline.PIPELINE not in PIPELINE_MAP


def test_concurrent_lntune_builds_leave_tvm_as_it_was():
    before, errors = _tvm_state(), []

    def build():
        try:
            assert PAIRS in kernel_source(Kernel("forward", 768, "bfloat16"), SM90)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and _same_state(_tvm_state(), before)


def _lowered_kernels(kernel: Kernel, knobs: dict | None = None) -> dict[str, set[str]]:
    knobs = database.choose(kernel, SM90).knobs if knobs is None else knobs
    mod = tvm.IRModule({kernel.name: database.scheduled(kernel, SM90, knobs)})
    with tvm.transform.PassContext(config=PASS_CONFIG):
        lowered = pipeline.factory()[0](tvm.tirx.transform.BindTarget(tvm.target.Target(SM90.spec, host="llvm"))(mod))
    return pipeline.cuda_kernel_wants(lowered)


def test_what_a_kernel_asks_for_comes_from_its_tir():
    """float32 kernels convert nothing to 16 bits; 16-bit ones do; the N = 16384 cluster kernels ask
    for the cluster launch, the counted exchange for the warps exchange, the prefetching ones for
    cp.async offsets widened."""
    (f32,) = _lowered_kernels(Kernel("backward", 1024, "float32", 1056)).values()
    assert "pack_conversions" not in f32 and "add_cluster_dims" not in f32
    (bf16,) = _lowered_kernels(Kernel("forward", 1024, "bfloat16")).values()
    assert {"pack_conversions", "whole_vector_stores"} <= bf16 and "add_cluster_dims" not in bf16
    (halves,) = _lowered_kernels(Kernel("backward", 16384, "bfloat16", 66)).values()
    assert {"add_cluster_dims", "exchange_warp_partials", pipeline.CP_ASYNC} <= halves
    (tagged,) = _lowered_kernels(Kernel("backward", 16384, "float32", 132)).values()
    assert "add_cluster_dims" in tagged and "exchange_warp_partials" not in tagged


def _broken(monkeypatch, name: str) -> None:
    """The registered rewrite `name` replaced by one that finds nothing (as after a TVM upgrade)."""

    def finds_nothing(code: str) -> str:
        return code

    finds_nothing.__name__ = name
    rewrites = [finds_nothing if r.__name__ == name else r for r in cuda_source._REWRITES]
    monkeypatch.setattr(cuda_source, "_REWRITES", rewrites)


@pytest.mark.parametrize(
    "name, kernel",
    [
        ("pack_conversions", Kernel("forward", 1024, "bfloat16")),
        ("whole_vector_stores", Kernel("forward", 1024, "bfloat16")),
        (cluster.add_cluster_dims.__name__, Kernel("backward", 16384, "float32", 132)),
        (cluster.exchange_warp_partials.__name__, Kernel("backward", 16384, "bfloat16", 66)),
    ],
)
def test_a_kernel_asking_for_a_rewrite_whose_pattern_is_absent_fails_naming_both(monkeypatch, name, kernel):
    """(RewriteMissing, raised in TVM's post-processor callback, reaches the caller as RuntimeError.)"""
    _broken(monkeypatch, name)
    with pytest.raises(RuntimeError, match=rf"{name}.*{kernel.name}_kernel"):
        kernel_source(kernel, SM90)


def test_a_kernel_that_does_not_use_a_feature_builds_without_its_rewrite(monkeypatch):
    """No float32 kernel converts to 16 bits, and a whole-row backward has no cluster: with those
    rewrites finding nothing, they build as before."""
    for name in ("pack_conversions", cluster.add_cluster_dims.__name__, cluster.exchange_warp_partials.__name__):
        _broken(monkeypatch, name)
    source = kernel_source(Kernel("backward", 1024, "float32", 1056), SM90)
    assert "__cluster_dims__" not in source and "__floats2" not in source


def test_cp_async_copies_without_64_bit_offsets_fail(monkeypatch):
    """TVM's cp.async codegen entries not found (renamed by an upgrade): a prefetching kernel's copies
    would keep 32-bit offsets, so its build fails naming it."""
    monkeypatch.setattr(hooks, "CP_ASYNC_OPS", ("no.such.op",))
    kernel = Kernel("backward", 16384, "bfloat16", 66)
    with pytest.raises(RuntimeError, match=rf"{kernel.name}_kernel.*cp.async"):
        kernel_source(kernel, SM90)


def test_rewrite_source_checks_each_kernel_for_what_it_asks():
    four = """
        v.x = (nv_bfloat16)(w.x);
        v.y = (nv_bfloat16)(w.y);
        v.z = (nv_bfloat16)(w.z);
        v.w = (nv_bfloat16)(w.w);"""
    a, b = 'extern "C" __global__ void a_kernel(float* x)', 'extern "C" __global__ void b_kernel(float* x)'
    source = f"{a} {{{four}\n}}\n{b} {{}}\n"
    assert PAIRS.rstrip("(") in cuda_source.rewrite_source(source, {"a_kernel": {"pack_conversions"}})
    assert cuda_source.rewrite_source(source, {"b_kernel": set()}) == cuda_source.rewrite_source(source)
    with pytest.raises(cuda_source.RewriteMissing, match="pack_conversions.*b_kernel"):
        cuda_source.rewrite_source(source, {"b_kernel": {"pack_conversions"}})
    with pytest.raises(cuda_source.RewriteMissing, match="c_kernel"):  # asked for, and not in the source at all
        cuda_source.rewrite_source(source, {"c_kernel": {"pack_conversions"}})
