"""A prefetching backward built without its software pipeline's own block barriers
(schedules.private_copies), checked where CI can: the lowered kernels and their CUDA source.
Whether it pays is measured on the H100 by lntune select (docs/performance.md, section 6)."""

from __future__ import annotations

import re

import pytest
import tvm

from lntune.build import PASS_CONFIG, kernel_source
from schedules import database, pipeline, private_copies, variants
from schedules.targets import get_target
from te_ops.layer_norm import Kernel

SM90 = get_target("cuda-sm90")
# Today's 16-bit N = 8192 structure: 1024 threads, staged rows prefetched one step ahead.
STAGED = {"threads": 1024, "threads_per_sm": 1024, "stage_rows": 2, "prefetch": 1, "chunked": 1, "unroll": 0}


def _lowered_kernel(kernel: Kernel, knobs: dict) -> tvm.tirx.PrimFunc:
    """The device kernel of `kernel` with these knobs, after lntune's TIR lowering."""
    mod = tvm.IRModule({kernel.name: database.scheduled(kernel, SM90, knobs)})
    lower = pipeline.factory()[0]  # lntune's lowering (registered with TVM only inside its builds)
    with tvm.transform.PassContext(config=PASS_CONFIG):
        out = lower(tvm.tirx.transform.BindTarget(tvm.target.Target(SM90.spec, host="llvm"))(mod))
    return next(f for gv, f in out.functions.items() if gv.name_hint == f"{kernel.name}_kernel")


def _barriers(func: tvm.tirx.PrimFunc) -> int:
    return str(func).count("T.tvm_storage_sync(")


@pytest.mark.parametrize("hidden, dtype, parts, threads", [(8192, "bfloat16", 132, 1024), (2048, "float16", 528, 256)])
def test_private_copies_drop_the_pipelines_barriers_and_keep_the_allreduces(hidden, dtype, parts, threads):
    """Two barriers a pipelined step and one before the last row go; the four of the two row
    allreduces (loop and last row) stay, and so do the copies and their waits."""
    kernel = Kernel("backward", hidden, dtype, parts)
    knobs = {**STAGED, "threads": threads}
    with_barriers = _lowered_kernel(kernel, {**knobs, "private_copies": 0})
    private = _lowered_kernel(kernel, {**knobs, "private_copies": 1})
    assert (_barriers(with_barriers), _barriers(private)) == (7, 4)
    for func in (with_barriers, private):
        text = str(func)
        assert text.count("cp_async_raw(") == 4 and "async_wait_inflight_count" in text
    source = kernel_source(kernel, SM90, {**knobs, "private_copies": 1})
    assert source.count("__syncthreads()") == 4
    assert len(re.findall(r"cp\.async\.wait_group \d;", source)) >= 1


def test_a_one_warp_row_keeps_no_barrier_at_all():
    """32 threads a row: the allreduce is all shuffles, so a private pipeline has no barrier left."""
    kernel = Kernel("backward", 1024, "float16", 1056)
    knobs = {**STAGED, "threads": 32, "threads_per_sm": 0, "chunked": 0, "unroll": 64}
    assert _barriers(_lowered_kernel(kernel, {**knobs, "private_copies": 0})) == 3
    assert _barriers(_lowered_kernel(kernel, {**knobs, "private_copies": 1})) == 0


def test_cluster_halves_keep_their_exchange():
    """A cluster kernel loses the pipeline's barriers only: the lowered kernel keeps the row
    allreduce's two (in the loop and in its last row) and calls the DSMEM exchange's helpers. (The
    CUDA post-pass then trades these for the warps exchange, tests/test_cluster.py.)"""
    kernel = Kernel("backward", 16384, "bfloat16", 66)
    knobs = {**database.choose(kernel, SM90).knobs, "private_copies": 1}
    assert knobs["cluster"] == 2 and knobs["prefetch"] == 1
    lowered = _lowered_kernel(kernel, knobs)
    assert _barriers(lowered) == 4
    calls = [str(lowered).count(f'lntune_cluster_{step}_counted"') for step in ("publish", "collect")]
    assert calls == [2, 2]  # by name, as the call's first argument (the helpers' source names them too)


def test_private_copies_is_a_knob_of_prefetching_backwards_only():
    """Offered with prefetch alone; knobs from before it build the kernel with its barriers."""
    kernel = Kernel("backward", 8192, "bfloat16", 132)
    assert database.exact_knobs(kernel, SM90, {**STAGED, "private_copies": 1})["private_copies"] == 1
    assert database.exact_knobs(kernel, SM90, {**STAGED, "prefetch": 0, "private_copies": 1}) is None
    assert database.exact_knobs(kernel, SM90, STAGED)["private_copies"] == 0
    assert private_copies.PRIVATE_KEY not in (database.scheduled(kernel, SM90, STAGED).attrs or {})
    assert database.scheduled(kernel, SM90, {**STAGED, "private_copies": 1}).attrs[private_copies.PRIVATE_KEY]


def test_every_prefetching_variant_has_a_private_twin_after_the_others():
    """The twins are appended (only staged cluster halves re-reading gamma come after them): the
    labels of the variants before them keep their knobs."""
    kernel = Kernel("backward", 8192, "bfloat16", 132)
    found = variants.variants(kernel, SM90, database.baseline_knobs(kernel, SM90))
    rereading = [i for i, v in enumerate(found) if v["cluster"] and v["stage_rows"] and not v["cache_gamma"]]
    found = found[: rereading[0]]
    first_twin = next(i for i, v in enumerate(found) if v.get("private_copies"))
    assert not any(v.get("private_copies") for v in found[:first_twin])
    assert all(v.get("private_copies") for v in found[first_twin:])
    assert {tuple(sorted({**v, "private_copies": 0}.items())) for v in found[first_twin:]} == {
        tuple(sorted({**v, "private_copies": 0}.items())) for v in found[:first_twin] if v["prefetch"]
    }
