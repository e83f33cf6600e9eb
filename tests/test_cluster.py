"""The backward's row split over a 2-block cluster (schedules.cluster), checked where CI can: the
schedule, the rewritten exchange and the CUDA source. It runs on the H100 only (lntune select,
lntune check, lntune bench; docs/performance.md, section 7)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tvm

from lntune import inspect
from lntune.build import device_source, kernel_source
from lntune.select import STACK_LIMIT
from schedules import backward, cluster, cuda_source, database, rules, spaces, tir_tree, variants
from schedules.knobs import Fixed
from schedules.targets import get_target
from te_ops.layer_norm import Kernel

SM90 = get_target("cuda-sm90")
WARPS_EXCHANGE = cluster.exchange_warp_partials.__name__


def _cluster_knobs(kernel: Kernel) -> dict:
    """One of the cluster variants select times: 1024 threads a half row, each thread's piece
    contiguous (interleaved, float32 caches go to local memory, as for whole rows)."""
    knobs = variants.variants(kernel, SM90, database.baseline_knobs(kernel, SM90))
    return next(k for k in knobs if k["cluster"] and k["threads"] == 1024 and k["chunked"] and k == _plain(k))


def _plain(knobs: dict) -> dict:
    return {**knobs, "prefetch": 0, "shared_acc": 0, "threads_per_sm": 0, "rows_per_step": 1, "cache_rows": 1}


def _blocks(stmt) -> list:
    """The blocks under `stmt`, in program order."""
    return [r.block for r in tir_tree.find(stmt, lambda n: isinstance(n, tvm.s_tir.SBlockRealize))]


def _kernel_body(source: str, name: str) -> str:
    start = source.index(f"{name}_kernel(", source.index(f"{name}_kernel(") + 1)  # the definition
    return source[start:]


def test_only_long_rows_on_sm90_split_over_a_cluster():
    assert backward.clusterable(Kernel("backward", 16384, "bfloat16", 132), SM90)
    assert backward.clusterable(Kernel("backward", 8192, "float32", 132), SM90)
    assert not backward.clusterable(Kernel("backward", 4096, "bfloat16", 132), SM90)
    for name in ("cuda-sm80", "rocm-gfx942", "llvm"):
        assert not backward.clusterable(Kernel("backward", 16384, "bfloat16", 132), get_target(name))
    assert rules.default_knobs(Kernel("backward", 16384, "bfloat16", 132), SM90)["cluster"] == 0


def test_the_rank_sum_becomes_one_exchange_per_row():
    """After the rewrite no block reduces over the rank: the per-rank block reduces half the
    columns, and the marked block reads only this block's own slot, published before the row's
    partial-sum updates and collected after them."""
    kernel = Kernel("backward", 16384, "bfloat16", 132)
    func = database.scheduled(kernel, SM90, _cluster_knobs(kernel))
    blocks = {b.name_hint: b for b in _blocks(func.body.block.body)}
    exchange = blocks["c"]
    assert cluster.EXCHANGE_KEY in exchange.annotations
    assert all(iv.iter_type == tvm.tirx.IterVar.DataPar for iv in exchange.iter_vars)
    assert cluster.helper("collect", "counted") in str(exchange.body)
    order = [b.name_hint for b in _blocks(func.body.block.body)]
    # The partial-sum updates (no need of c1, c2) wait out the partner between publish and collect.
    assert order.index("c_publish") < order.index("dgamma_part_update") < order.index("dbeta_part_update")
    assert order.index("dbeta_part_update") < order.index("c") < order.index("dx")
    reduced = [iv for iv in blocks["c_rf"].iter_vars if iv.iter_type == tvm.tirx.IterVar.CommReduce]
    assert [int(iv.dom.extent) for iv in reduced] == [kernel.hidden // cluster.SIZE]


def test_a_function_without_the_mark_is_left_as_it_is():
    kernel = Kernel("backward", 16384, "bfloat16", 132)
    sch = tvm.s_tir.Schedule(kernel.prim_func())
    spaces.apply(sch, kernel, SM90, Fixed(database.baseline_knobs(kernel, SM90)))
    assert cluster.with_cluster_exchange(sch.mod["main"]).same_as(sch.mod["main"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_cuda_kernel_is_a_cluster_of_two_over_the_grid_x(dtype):
    kernel = Kernel("backward", 16384, dtype, 132)
    with cuda_source.without(WARPS_EXCHANGE):  # the counted exchange as the TIR emits it
        source = kernel_source(kernel, SM90, _cluster_knobs(kernel))
    declarations = re.findall(rf"__global__ void .*{kernel.name}_kernel\(", source)
    assert len(declarations) == 2 and all("__cluster_dims__(2, 1, 1)" in d for d in declarations)
    body = _kernel_body(source, kernel.name)
    calls = tuple(f"{cluster.helper(step, 'counted')}(" for step in ("publish", "collect", "start", "finish"))
    assert [body.count(call) for call in calls] == [1, 1, 1, 1]
    assert body.index(calls[2]) < body.index(calls[0])
    # Every thread reaches both halves of the barrier: no thread predicate around either call.
    lines = body.splitlines()
    for call in calls[:2]:
        at = next(i for i, line in enumerate(lines) if call in line)
        guards = [line for line in lines[at - 2 : at] if line.strip().startswith("if (")]
        assert guards and not any("threadIdx" in guard for guard in guards), lines[at - 2 : at + 1]
    assert "blockIdx.y" in body  # the chunk of rows; blockIdx.x is the rank
    if shutil.which("nvcc"):
        facts = inspect.ptxas_report(inspect.compile_cubin(source.encode(), "sm_90")[1])[kernel.name]
        assert facts["stack"] <= STACK_LIMIT  # what select allows


def test_row_caches_laid_out_in_pieces_get_the_exchange_without_a_fence():
    """st.async (counted) where each thread's row piece is contiguous; interleaved caches keep the
    tagged push, since with st.async in the kernel ptxas leaves them in local memory."""
    assert cluster.protocol_for({"chunked": 1}) == "counted"
    assert cluster.protocol_for({"chunked": 0}) == cluster.protocol_for({}) == "tagged"
    kernel = Kernel("backward", 16384, "float32", 264)
    knobs = {**_cluster_knobs(kernel), "chunked": 0}
    body = _kernel_body(kernel_source(kernel, SM90, knobs), kernel.name)
    assert f"{cluster.helper('collect', 'tagged')}(" in body and "_counted(" not in body


def test_the_exchange_counts_rows_from_the_start_of_the_chunk():
    """Slots and barrier phases follow the row's position in its chunk, the same in both blocks
    and counted from 0 in every chunk (a row index would start some chunks in phase 1)."""
    kernel = Kernel("backward", 16384, "bfloat16", 132)
    func = database.scheduled(kernel, SM90, _cluster_knobs(kernel))
    publish = next(b for b in _blocks(func.body.block.body) if b.name_hint == "c_publish")
    (row, position) = [iv.var for iv in publish.iter_vars]
    realize = tir_tree.find(func.body, lambda n: isinstance(n, tvm.s_tir.SBlockRealize) and n.block.same_as(publish))
    bound = {str(v) for v in realize[0].iter_values[1:]}
    assert not any("blockIdx" in b or "i_0" in b for b in bound), bound  # no chunk, no rank
    assert str(position) in str(publish.body) and str(row) not in str(publish.body.value.args[-1])


def test_a_row_that_is_not_a_chunk_start_plus_a_position_is_refused():
    rows = tvm.tirx.Var("M", "int64")
    chunk, step, granule = (tvm.tirx.Var(name, "int64") for name in ("chunk", "step", "granule"))
    row = chunk * ((rows + 263) // 264 * 2) + step * 2 + granule
    assert str(cluster._position_in_chunk(row, chunk)) == str(step * 2 + granule)
    with pytest.raises(ValueError, match="not a chunk's start plus a position"):
        cluster._position_in_chunk(row * (step + 1), chunk)


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_one_library_may_hold_kernels_of_both_protocols():
    """Each protocol's helpers have their own names and include guard (export builds every
    kernel into one CUDA source): both compile, and neither kernel goes to local memory."""
    funcs = {}
    # float32: the layout of its N = 16384 choice (interleaved, accumulators in shared memory).
    interleaved = {"chunked": 0, "threads": 512, "shared_acc": 1}
    for dtype, parts, layout in (("bfloat16", 132, {}), ("float32", 264, interleaved)):
        kernel = Kernel("backward", 16384, dtype, parts)
        funcs[kernel.name] = database.scheduled(kernel, SM90, {**_cluster_knobs(kernel), **layout})
    source = device_source(tvm.IRModule(funcs), SM90)
    facts = inspect.ptxas_report(inspect.compile_cubin(source.encode(), "sm_90")[1])
    assert set(facts) == set(funcs) and all(f["stack"] <= STACK_LIMIT for f in facts.values())


def test_cluster_dims_mark_only_the_kernels_that_exchange():
    source = (
        "__device__ float2 lntune_cluster_collect_tagged(float a, float b, int p) { return make_float2(a, b); }\n"
        'extern "C" __global__ void __launch_bounds__(256) a_kernel(float* x);\n'
        'extern "C" __global__ void __launch_bounds__(256) a_kernel(float* x) {'
        " lntune_cluster_collect_tagged(1, 2, 0); }\n"
        'extern "C" __global__ void b_kernel(float* x) { x[0] = 1; }\n'
    )
    marked = cluster.add_cluster_dims(source)
    assert marked.count("__launch_bounds__(256) __cluster_dims__(2, 1, 1) a_kernel(") == 2
    assert "void b_kernel(float* x) { x[0] = 1; }" in marked
    assert cluster.add_cluster_dims("no kernels here") == "no kernels here"


def test_the_cluster_launch_comes_with_lntunes_hooks_and_needs_nothing_but_schedules(tmp_path):
    """A build of a rewritten function outside lntune's builds (plain tvm.compile) gets TVM's source, no
    cluster mark: importing schedules changes nothing in TVM. Inside schedules.hooks.installed (what
    every lntune build runs in) it is marked, with no lntune.build imported."""
    script = f"""
import sys, tvm
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from schedules import database, hooks, rules
from schedules.targets import get_target
from te_ops.layer_norm import Kernel
target = get_target("cuda-sm90")
kernel = Kernel("backward", 16384, "bfloat16", 132)
knobs = {{**rules.default_knobs(kernel, target), "cluster": 2, "threads": 1024, "explicit_unroll": 0}}
mod = tvm.IRModule({{kernel.name: database.scheduled(kernel, target, knobs)}})
def marked():
    lib = tvm.compile(mod, target=tvm.target.Target(target.spec, host="llvm"))
    return "__cluster_dims__(2, 1, 1)" in lib.mod.imports[0].inspect_source()
plain = marked()
with hooks.installed(target):
    inside = marked()
assert "lntune.build" not in sys.modules
print(plain, inside, marked())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False True False"


def test_staged_halves_also_come_with_gamma_re_read_then_shared_last_in_the_grid():
    """Staged cluster halves with gamma kept in registers spilled at 64 registers; their twins that
    re-read gamma, then those that keep it in shared memory, come after every other variant, so
    earlier labels keep their knobs."""
    kernel = Kernel("backward", 16384, "bfloat16", 66)
    found = variants.variants(kernel, SM90, database.baseline_knobs(kernel, SM90))
    staged = [v for v in found if v["cluster"] and v["stage_rows"] and v["cache_gamma"] == 1]
    rereading = [v for v in found if v["cluster"] and v["stage_rows"] and not v["cache_gamma"]]
    shared = [v for v in found if v["cache_gamma"] == backward.GAMMA_SHARED]
    assert staged and len(rereading) == len(staged) == len(shared)
    assert all({**v, "cache_gamma": 0} in rereading and {**v, "cache_gamma": 2} in shared for v in staged)
    first = found.index(rereading[0])
    assert found[first:] == rereading + shared
    assert all(v["stage_rows"] == 2 and v["prefetch"] for v in shared)


def test_shared_gamma_is_widened_once_a_block_and_read_from_shared_memory():
    """cache_gamma 2: the block's gamma slice goes to shared memory as fp32 before the row loop;
    the rows read it there (no global gamma load in the loop), and the kernel keeps no barrier of
    its own for it (each thread reads back only what it wrote)."""
    kernel = Kernel("backward", 16384, "bfloat16", 66)
    today = database.choose(kernel, SM90).knobs
    reread, shared = ({**today, "stage_rows": 2, "cache_gamma": g} for g in (0, backward.GAMMA_SHARED))
    for knobs in (reread, shared):
        assert database.exact_knobs(kernel, SM90, knobs) == knobs
    sources = [kernel_source(kernel, SM90, k) for k in (reread, shared)]
    loops = [_kernel_body(s, kernel.name).split("for (int64_t i_", 1)[1] for s in sources]
    assert "gamma_ptr[" in loops[0] and "gamma_ptr" not in loops[1]
    before = _kernel_body(sources[1], kernel.name).split("for (int64_t i_", 1)[0]
    assert before.count("gamma_ptr + ") == 1 and "((float*)buf_dyn_shmem_ptr)" in before
    assert sources[1].count("__syncthreads()") == sources[0].count("__syncthreads()")
    with pytest.raises(ValueError, match="stage_rows 2"):
        database.scheduled(kernel, SM90, {**shared, "stage_rows": 0})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_counted_halves_exchange_warp_sums_with_no_block_barrier(dtype):
    """The selected 16-bit N = 16384 kernels (counted exchange, 1024 threads) come out of the CUDA
    post-pass with the warps exchange: every row's publish and collect, and no block barrier."""
    kernel = Kernel("backward", 16384, dtype, 66)
    body = _kernel_body(kernel_source(kernel, SM90), kernel.name)
    assert body.count("lntune_cluster_publish_warps(") == body.count("lntune_cluster_collect_warps(") == 2
    assert "lntune_cluster_start_counted();" in body and "lntune_cluster_finish_counted();" in body  # its barriers
    assert "_publish_counted(" not in body and "_collect_counted(" not in body and "__syncthreads()" not in body
    # Every thread of both blocks reaches the publish (thread 0 arrives for its block) and the
    # collect (each waits): only the row predicate, the same in both blocks, guards them.
    lines = body.splitlines()
    for call in ("lntune_cluster_publish_warps(", "lntune_cluster_collect_warps("):
        for at in (i for i, line in enumerate(lines) if call in line):
            guard = lines[at - 1].strip()
            assert guard.startswith("if (") and "threadIdx" not in guard and ("< M)" in guard or "<= M)" in guard)


def test_the_warps_exchange_leaves_a_source_it_does_not_recognise_as_it_is():
    """Sources without a counted exchange (float32's tagged one) and counted ones whose allreduce is
    not in TVM's expected form stay as they are, publish and collect alike."""
    tagged = kernel_source(Kernel("backward", 16384, "float32", 132), SM90)
    assert "_tagged(" in tagged and cluster.exchange_warp_partials(tagged) == tagged
    with cuda_source.without(WARPS_EXCHANGE):
        counted = kernel_source(Kernel("backward", 16384, "bfloat16", 66), SM90)
    assert "lntune_cluster_publish_counted(" in counted
    assert "lntune_cluster_publish_warps(" in cluster.exchange_warp_partials(counted)
    changed = counted.replace("__syncthreads();", "__syncthreads(); ", 1)  # one region not as expected
    assert cluster.exchange_warp_partials(changed) == changed


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_the_warps_exchange_compiles_without_barriers_or_spills():
    source = kernel_source(Kernel("backward", 16384, "bfloat16", 66), SM90).encode()
    facts = inspect.cuda_resources(source, "sm_90a")["lntune_backward_bfloat16_n16384_p66"]
    assert facts["stack"] == facts["spill_stores"] == 0


def test_the_warps_exchange_takes_only_the_cluster_kernels_allreduce():
    """In one source with a whole-row backward before the cluster kernel (export builds them all
    into one), the earlier kernel's allreduce, which has the same staging stores, stays as it is."""
    kernels = [Kernel("backward", 1024, "bfloat16", 1056), Kernel("backward", 16384, "bfloat16", 66)]
    funcs = {k.name: database.scheduled(k, SM90, database.choose(k, SM90).knobs) for k in kernels}
    source = device_source(tvm.IRModule(funcs), SM90)
    whole_row, halves = (_kernel_body(source, k.name) for k in kernels)
    whole_row = whole_row[: whole_row.index("extern")] if "extern" in whole_row else whole_row
    assert "red_buf_staging_ptr" in whole_row and whole_row.count("__syncthreads()") >= 2
    assert "_warps(" not in whole_row
    assert halves.count("lntune_cluster_collect_warps(") == 2 and "__syncthreads()" not in halves
    if shutil.which("nvcc"):
        facts = inspect.cuda_resources(source.encode(), "sm_90a")
        assert set(facts) == set(funcs)
