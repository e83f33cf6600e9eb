"""Design spaces, baselines on every target family, and the schedule chooser."""

import json
import re
import warnings

import numpy as np
import pytest
import tvm
import tvm_ffi

from lntune import select, timing
from lntune.build import kernel_library, kernel_source, kernels_for
from schedules import backward, database, estimates, layout, rules, spaces, variants
from schedules.knobs import Fixed, Sampled, decisions_of
from schedules.targets import TARGETS, get_target
from te_ops.layer_norm import Kernel

GPU_TARGETS = [t for t in TARGETS if t != "llvm"]


@pytest.mark.parametrize("target_name", GPU_TARGETS)
@pytest.mark.parametrize("hidden,dtype", [(768, "bfloat16"), (4096, "float32"), (16384, "float16")])
def test_baselines_build_for_every_gpu_target(target_name, hidden, dtype):
    """Scheduled, lowered and code-generated (no device needed): the GPU code passes TVM's checks."""
    target = get_target(target_name)
    if target.family == "rocm":
        pytest.importorskip("tvm")
        from lntune import toolchain

        try:
            toolchain.prepare_rocm()
        except RuntimeError as err:
            pytest.skip(str(err))
    mod = tvm.IRModule()
    for kernel in kernels_for(hidden, dtype, target):
        mod[kernel.name] = database.scheduled(kernel, target, database.baseline_knobs(kernel, target))
    lib = tvm.compile(mod, target=tvm.target.Target(target.spec, host="llvm"))
    assert lib.mod.imports, "no device module"


@pytest.mark.parametrize("op", ["forward", "forward_stats", "backward", "backward_sum"])
def test_design_space_traces_replay(op):
    """A sampled design space yields traces whose decisions replay onto a fresh schedule."""
    target = get_target("cuda-sm90")
    kernel = Kernel(op, 2048, "bfloat16", 264 if op.startswith("backward") else 0)
    for structure in spaces.structures(kernel, target):
        sch = tvm.s_tir.Schedule(database.workload(kernel, target)["main"], seed=7)
        spaces.apply(sch, kernel, target, Sampled(structure))
        trace = sch.trace.simplified(remove_postproc=True)
        fresh = tvm.s_tir.Schedule(database.workload(kernel, target)["main"])
        trace.apply_to_schedule(fresh, remove_postproc=True)
        assert tvm_ffi.structural_equal(fresh.mod, sch.mod)
        assert all(isinstance(v, int) for v in decisions_of(sch.trace))


def test_backward_space_has_one_design_per_structure():
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 1024, "float32", 264)
    assert len(spaces.structures(kernel, target)) == 8
    assert spaces.structures(Kernel("forward", 1024, "float32"), target) == [{}]


def test_fixed_knobs_outside_candidates_fall_back():
    target = get_target("cuda-sm90")
    kernel = Kernel("forward", 1024, "float32")
    fixed = Fixed({"threads": 999, "rows_per_block": 2})
    spaces.apply(tvm.s_tir.Schedule(kernel.prim_func()), kernel, target, fixed)
    assert fixed.used["rows_per_block"] == 2
    assert fixed.used["threads"] in layout.thread_candidates(kernel, target)


def _write_database(folder, kernel, target, traced, seconds=1e-4, extra_lines=()):
    """A real MetaSchedule JSON database in `folder` holding one record: `traced`'s trace."""
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
    mod = database.workload(kernel, target)
    workload = db.commit_workload(mod)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    db.commit_tuning_record(ms.database.TuningRecord(traced.trace, workload, [seconds], target.tvm_target(), args))
    records = folder / database.RECORDS
    records.write_text("".join(extra_lines) + records.read_text())


STRUCTURAL = ("cache_rows", "cache_gamma", "chunked", "rows_per_step", "explicit_unroll", "shared_acc")
STRUCTURAL += ("threads_per_sm", "stage_rows", "prefetch", "private_copies", "row_scalars", "cluster")
# as the tuning spaces hold
ONE_ROW_A_STEP = {
    "rows_per_step": 1,
    "explicit_unroll": 1,
    "shared_acc": 0,
    "threads_per_sm": 0,
    "stage_rows": 0,
    "prefetch": 0,
    "private_copies": 0,
    "row_scalars": 0,
    "cluster": 0,
}


def _records_of(folder, kernel, target, knobs) -> dict:
    """The records read back from a database in `folder` holding one tuned record with `knobs`."""
    _write_database(folder, kernel, target, _traced(kernel, target, knobs))
    return database.read_records(folder)


def _traced(kernel, target, knobs):
    """A traced schedule of the design space whose decisions are `knobs`, as a tuned record holds."""
    sch = tvm.s_tir.Schedule(database.workload(kernel, target)["main"])
    spaces.apply(sch, kernel, target, Sampled({k: v for k, v in knobs.items() if k in STRUCTURAL}))
    names = iter(n for n in spaces.knob_names(kernel, target) if n not in STRUCTURAL)
    trace = sch.trace
    for inst in trace.insts:
        if inst.kind.name == "SampleCategorical" and len(inst.attrs[0]) > 1:
            candidates = [int(c) for c in inst.attrs[0]]
            trace = trace.with_decision(inst, candidates.index(knobs[next(names)]), True)
    fresh = tvm.s_tir.Schedule(database.workload(kernel, target)["main"])
    trace.apply_to_schedule(fresh, remove_postproc=False)
    return fresh


def test_chooser_prefers_a_tuned_record_and_falls_back(tmp_path):
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 4096, "float32", rules.parts_for(target, 4096, "float32"))
    wanted = {**ONE_ROW_A_STEP, "cache_rows": 1, "cache_gamma": 0, "chunked": 1, "threads": 512, "unroll": 16}
    records = _records_of(tmp_path, kernel, target, wanted)
    choice = database.choose(kernel, target, records, selection={})
    assert choice.source.startswith("tuned:")
    assert choice.knobs == wanted
    other = Kernel("backward", 2048, "float32", rules.parts_for(target, 2048, "float32"))
    assert database.choose(other, target, records, selection={}).source == "baseline"
    verdict = {kernel.name: {"choice": "baseline", "us": {"baseline": 1.0, "tuned": 2.0}}}
    assert database.choose(kernel, target, records, selection=verdict).source.startswith("baseline (selected")


def test_a_kernel_at_another_p_takes_the_record_tuned_at_the_rules_p(tmp_path):
    """P only sizes the row chunks: a P chosen by select --parts keeps the knobs tuned at the rule's P."""
    target = get_target("cuda-sm90")
    rule = rules.parts_for(target, 4096, "float32")
    kernel = Kernel("backward", 4096, "float32", rule)
    wanted = {**ONE_ROW_A_STEP, "cache_rows": 1, "cache_gamma": 0, "chunked": 1, "threads": 512, "unroll": 16}
    records = _records_of(tmp_path, kernel, target, wanted)
    moved = database.choose(Kernel("backward", 4096, "float32", rule * 2), target, records, selection={})
    assert moved.source.startswith(f"transfer:p{rule}:") and moved.knobs == wanted
    twin_moved = database.choose(Kernel("backward", 4096, "bfloat16", rule * 2), target, records, selection={})
    assert twin_moved.source == "baseline"  # a float32 record is no 16-bit kernel's twin


@pytest.mark.parametrize("rows_per_step,explicit_unroll", [(2, 0), (1, 0), (1, 1)])
def test_tuned_record_keeps_rows_per_step_and_unrolling(tmp_path, rows_per_step, explicit_unroll):
    """MetaSchedule drops the one-candidate structure samples; the annotations must still say them."""
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 2048, "bfloat16", rules.parts_for(target, 2048, "bfloat16"))
    layout = {"rows_per_step": rows_per_step, "explicit_unroll": explicit_unroll}
    wanted = {"cache_rows": 1, "cache_gamma": 1, "chunked": 1, **layout, "shared_acc": 0, "threads_per_sm": 0}
    wanted.update(stage_rows=0, prefetch=0, private_copies=0, row_scalars=0, cluster=0)
    wanted.update(threads=128, unroll=64)
    assert database.choose(kernel, target, _records_of(tmp_path, kernel, target, wanted), selection={}).knobs == wanted


def test_chooser_takes_a_selected_variant_and_checks_it():
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 768, "float32", rules.parts_for(target, 768, "float32"))
    variant = variants.variants(kernel, target, database.baseline_knobs(kernel, target))[-1]
    verdict = {"choice": "variant", "label": "variant9", "knobs": variant, "us": {"variant9": 1.0}}
    choice = database.choose(kernel, target, {}, selection={kernel.name: verdict})
    assert choice.knobs == variant and choice.source.startswith("selected:variant9")
    stale = {kernel.name: {**verdict, "knobs": {**variant, "threads": 7}}}
    with pytest.warns(UserWarning, match="selected variant does not fit"):
        assert database.choose(kernel, target, {}, selection=stale).source == "baseline"


def test_backward_variants_build_for_cuda():
    """Every structural variant that select may time passes TVM's GPU checks and generates code."""
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 1024, "float32", rules.parts_for(target, 1024, "float32"))
    found = variants.variants(kernel, target, database.baseline_knobs(kernel, target))
    assert {(v["rows_per_step"], v["explicit_unroll"]) for v in found} == {(1, 1), (1, 0), (2, 0)}
    for knobs in found:
        source = _cuda_source(kernel, knobs)
        assert ("#pragma unroll" in source) == (not knobs["explicit_unroll"])


def test_float16_takes_bfloat16_records_as_a_transfer(tmp_path):
    target = get_target("cuda-sm90")
    parts = rules.parts_for(target, 1024, "bfloat16")
    bf16 = Kernel("backward", 1024, "bfloat16", parts)
    wanted = {**ONE_ROW_A_STEP, "cache_rows": 1, "cache_gamma": 1, "chunked": 0, "threads": 64, "unroll": 512}
    records = _records_of(tmp_path, bf16, target, wanted)
    choice = database.choose(Kernel("backward", 1024, "float16", parts), target, records, {})
    assert choice.source.startswith("transfer:bfloat16") and choice.knobs == wanted


def test_a_failed_candidate_is_not_a_tuned_record(tmp_path):
    """MetaSchedule stores a failed build or run as 1e10 s; such a record must not be exported as tuned."""
    target = get_target("cuda-sm90")
    kernel = Kernel("forward", 1024, "float32")
    sch = tvm.s_tir.Schedule(database.workload(kernel, target)["main"])
    spaces.apply(sch, kernel, target, Fixed({"threads": 128, "rows_per_block": 2, "unroll": 16}))
    _write_database(tmp_path, kernel, target, sch, seconds=1e10)
    assert database.read_records(tmp_path) == {}
    assert database.choose(kernel, target, database.read_records(tmp_path), {}).source == "baseline"


def test_damaged_database_line_warns_and_keeps_the_rest(tmp_path):
    target = get_target("cuda-sm90")
    kernel = Kernel("forward", 1024, "float32")
    wanted = {"threads": 128, "rows_per_block": 2, "unroll": 16}
    sch = tvm.s_tir.Schedule(database.workload(kernel, target)["main"])
    spaces.apply(sch, kernel, target, Fixed(wanted))
    _write_database(tmp_path, kernel, target, sch, extra_lines=['[0, [[["GetSBlock"\n', "not json at all\n"])
    with pytest.warns(UserWarning, match=r"database_tuning_record.json:1: skipped a damaged line"):
        records = database.read_records(tmp_path)
    assert len(records) == 1


def test_every_exported_cuda_backward_kernel_takes_selects_verdict():
    """Each backward and partials sum that export builds has a committed verdict of `lntune select`
    that still fits today's design space: a space change that orphaned one would silently put the
    baseline back (with only a warning)."""
    target = get_target("cuda-sm90")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sources = {
            k.name: database.choose(k, target).source
            for n in (768, 1024, 2048, 4096, 5120, 8192, 16384)
            for dtype in ("float32", "bfloat16", "float16")
            for k in kernels_for(n, dtype, target)
            if k.op.startswith("backward")
        }
    assert len(sources) == 42
    assert all(s.startswith(("selected:", "baseline (selected:")) for s in sources.values()), sources


def test_committed_cuda_logs_give_tuned_backward_kernels():
    """The committed tuning logs are read, and every record fits today's design space."""
    target = get_target("cuda-sm90")
    records = database.read_records(database.TUNING_LOGS / target.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sources = [
            database.choose(k, target, records, selection={}).source
            for n in (2048, 8192, 16384)
            for k in kernels_for(n, "float32", target)
            if k.op == "backward"
        ]
    # A record tuned at another P (select --parts moved float32 N = 16384 to P = 132) transfers.
    assert all(s.startswith(("tuned:", "transfer:p")) for s in sources), sources


def test_forward_records_tuned_before_the_exact_statistics_are_still_found():
    """The forward's TE changed (te_ops' _row_moments), so its workload hash did; the records tuned
    on the old one are found through its legacy hash (their knobs name the same schedule)."""
    target = get_target("cuda-sm90")
    records = database.read_records(database.TUNING_LOGS / target.name)
    for op in ("forward", "forward_stats"):
        kernel = Kernel(op, 16384, "bfloat16")
        current, legacy = database.workload_hashes(kernel, target)
        assert current not in records and legacy in records
        choice = database.choose(kernel, target, records, selection={})
        assert choice.source.startswith(f"tuned:{legacy}:"), choice.source
    assert len(database.workload_hashes(Kernel("forward", 16384, "bfloat16", param_dtype="float32"), target)) == 1
    assert len(database.workload_hashes(Kernel("backward", 16384, "bfloat16", 66), target)) == 1


def _cuda_source(kernel: Kernel, knobs: dict) -> str:
    return kernel_source(kernel, get_target("cuda-sm90"), knobs)


def test_backward_reduces_c1_and_c2_in_one_allreduce():
    """The (c1, c2) pair is one cross-thread reduction: with two warps per row, two barriers, not four."""
    kernel = Kernel("backward", 1024, "bfloat16", 1056)
    knobs = {**ONE_ROW_A_STEP, "cache_rows": 1, "cache_gamma": 1, "chunked": 0, "threads": 64, "unroll": 64}
    source = _cuda_source(kernel, knobs)
    assert source.count("__syncthreads()") == 2


@pytest.mark.parametrize("threads_per_sm,bounds", [(0, "__launch_bounds__(512)"), (1024, "__launch_bounds__(512, 2)")])
def test_threads_per_sm_reaches_the_launch_bounds(threads_per_sm, bounds):
    """threads_per_sm becomes __launch_bounds__'s minimum blocks per SM (what ptxas budgets registers by)."""
    kernel = Kernel("backward", 4096, "bfloat16", 528)
    knobs = {**ONE_ROW_A_STEP, "cache_rows": 1, "cache_gamma": 1, "chunked": 1, "threads": 512, "unroll": 64}
    source = _cuda_source(kernel, {**knobs, "rows_per_step": 2, "explicit_unroll": 0, "threads_per_sm": threads_per_sm})
    assert f"{bounds} lntune_backward_bfloat16_n4096_p528_kernel(" in source


def test_occupancy_variants_fit_the_register_file():
    """select's threads_per_sm variants only ask for what registers_needed says fits 64K registers."""
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 4096, "bfloat16", 528)
    found = variants.variants(kernel, target, database.baseline_knobs(kernel, target))
    occupied = [v for v in found if v["threads_per_sm"]]
    assert occupied and all(v["threads"] <= v["threads_per_sm"] for v in occupied)
    assert all(estimates.registers_needed(kernel, v) * v["threads_per_sm"] <= 65536 for v in occupied)
    assert {v["threads"] for v in occupied} == {512}  # 256 threads keep 16 columns each: ~100 registers


@pytest.mark.parametrize("changed,local", [({"stage_rows": 1}, "dyg_local"), ({"row_scalars": 1}, "crow_local")])
def test_stages_leave_the_allreduce_result_to_thread_zero(changed, local):
    """With staged rows or per-row scalars, only the allreduce's own thread-0 stores write its shared
    result (per-row stages computed from it once scaled it in place from every thread: a race, see
    te_ops)."""
    kernel = Kernel("backward", 4096, "bfloat16", 264)
    knobs = {**ONE_ROW_A_STEP, "cache_rows": 1, "cache_gamma": 1, "chunked": 1, "threads": 512, "unroll": 64}
    source = _cuda_source(kernel, {**knobs, "rows_per_step": 2, "explicit_unroll": 0, **changed})
    stores = re.findall(r"\(\(volatile float\*\)red_result\w*\)\[0\] = ([^;]*);", source)
    assert stores and all(value.startswith("red_buf") for value in stores), stores
    assert local in source


def test_row_scalars_read_the_allreduce_result_once_a_row():
    """Inlined, c1/N and c2/N re-read the volatile shared result for every element: in the source,
    c1 and c2 in each lane of the 4-lane vector expression (looped over the row's vectors), 8 reads;
    kept per row, c1 and c2 once."""
    kernel = Kernel("backward", 4096, "bfloat16", 264)
    knobs = {**ONE_ROW_A_STEP, "cache_rows": 1, "cache_gamma": 1, "chunked": 1, "threads": 512, "unroll": 64}
    knobs = {**knobs, "rows_per_step": 2, "explicit_unroll": 0}

    def reads(source: str) -> int:
        stores = len(re.findall(r"\(\(volatile float\*\)red_result\w*\)\[0\] = ", source))
        return source.count("((volatile float*)red_result") - stores

    inlined, kept = reads(_cuda_source(kernel, knobs)), reads(_cuda_source(kernel, {**knobs, "row_scalars": 1}))
    assert (inlined, kept) == (8, 2)


@pytest.mark.parametrize("kernel", [Kernel("forward", 4096, "bfloat16"), Kernel("forward_stats", 5120, "float32")])
def test_forward_reads_the_allreduce_results_once_a_row(kernel):
    """The row's shift and terms (te_ops' x_shift, x_terms) are read from the allreduces' volatile
    shared results once a row (two each), never per element (inlined, 3 reads an element in the
    pair and 2-3 in y); and only the allreduce's thread-0 stores write those results (stages made
    of one element were rewritten into them in place by every thread: the race of te_ops)."""
    source = _cuda_source(kernel, database.baseline_knobs(kernel, get_target("cuda-sm90")))
    stores = re.findall(r"\(\(volatile float\*\)red_result\w*\)\[0\] = ([^;]*);", source)
    assert stores and all(value.startswith("red_buf") for value in stores), stores
    assert source.count("((volatile float*)red_result") - len(stores) == 4
    assert "x_shift_local" in source and "x_terms_local" in source


@pytest.mark.parametrize("depth,rows_per_step", [(1, 1), (2, 2)])
def test_prefetch_copies_rows_ahead_with_cp_async(depth, rows_per_step):
    """prefetch copies x and dy `depth` steps ahead into shared memory with cp.async, then waits with
    `depth` groups still in flight; the copy's global offset is 64-bit (TVM's own helper takes int)."""
    kernel = Kernel("backward", 4096, "bfloat16", 264)
    knobs = {**ONE_ROW_A_STEP, "cache_rows": 1, "cache_gamma": 1, "chunked": 1, "threads": 512, "unroll": 64}
    plain = _cuda_source(kernel, {**knobs, "rows_per_step": rows_per_step, "explicit_unroll": 0})
    source = _cuda_source(kernel, {**knobs, "rows_per_step": rows_per_step, "explicit_unroll": 0, "prefetch": depth})
    assert "cp.async" not in plain
    assert "cp.async.cg.shared.global" in source and f"cp.async.wait_group {depth};" in source
    copies = re.findall(r"\n\s+(ptx_cp_async\w*)\(buf_dyn_shmem_ptr", source)
    # x and dy, before the loop (the first step) and in it (the step `depth` ahead)
    assert len(copies) == 4 and set(copies) == {"ptx_cp_async_legacy_cg_16_2_2_i64"}
    assert "void* src, long long src_off" in source and "int src_off" not in source


def test_prefetch_variants_fit_shared_memory():
    """Prefetching variants keep their rows in the block's opt-in shared memory, never beside shared
    accumulators (TVM cannot place their barriers), and whole float32 rows of 16384 have none."""
    target = get_target("cuda-sm90")
    for n, dtype in ((4096, "bfloat16"), (8192, "float32"), (16384, "float16")):
        kernel = Kernel("backward", n, dtype, 132)
        ahead = [v for v in variants.variants(kernel, target, database.baseline_knobs(kernel, target)) if v["prefetch"]]
        assert ahead and {v["prefetch"] for v in ahead} <= {1, 2}
        assert all(estimates.shared_bytes_needed(kernel, v) <= 227 * 1024 and not v["shared_acc"] for v in ahead)
    kernel = Kernel("backward", 16384, "float32", 132)
    whole_rows = [
        v for v in variants.variants(kernel, target, database.baseline_knobs(kernel, target)) if not v["cluster"]
    ]
    assert not any(v["prefetch"] for v in whole_rows)


def test_variants_add_row_scalars_and_prefetched_staged_rows():
    """Per-row scalars on the unstaged variants; staged rows prefetched with and without them."""
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 8192, "bfloat16", 132)
    found = variants.variants(kernel, target, database.baseline_knobs(kernel, target))
    unstaged = [v for v in found if not v["stage_rows"] and not v["row_scalars"]]
    assert all({**v, "row_scalars": 1} in found for v in unstaged)
    staged_ahead = [v for v in found if v["stage_rows"] and v["prefetch"]]
    assert {(v["stage_rows"], v["prefetch"], v["row_scalars"]) for v in staged_ahead} == {
        (s, p, r) for s in (1, 2) for p in (1, 2) for r in (0, 1)
    }
    assert not any(v["stage_rows"] and v["row_scalars"] and not v["prefetch"] for v in found)


@pytest.mark.parametrize("lanes", [1, 32])
def test_partials_sum_splits_p_over_lanes(lanes):
    kernel = Kernel("backward_sum", 1024, "float32", 528)
    source = _cuda_source(kernel, {"threads": 32, "lanes": lanes, "unroll": 64})
    body = source[source.rindex(f"{kernel.name}_kernel(") :]  # the definition, not included helpers
    assert ("threadIdx.y" in body) == (lanes > 1)
    assert f"__launch_bounds__({32 * lanes})" in source


def test_cpu_bfloat16_backward_candidates_build():
    """On a CPU the pair reduction (and its vector lanes, c_rf) must lose its Bind form (tuning does
    it in a postprocessor): with it, TVM 0.27's bf16 legalization fails on row caches, or where rows
    are re-read builds a dx of garbage; with the postprocessor every design builds and is right."""
    from lntune.select import device_arguments
    from schedules.tune import tune_context
    from te_ops import reference

    target = get_target("llvm")
    kernel = Kernel("backward", 64, "bfloat16", 16)
    context = tune_context(kernel, target, seed=3)
    llvm = tvm.target.Target(target.spec, host="llvm")
    rows = database.tune_rows(kernel, target)
    args = device_arguments(kernel, rows, tvm.cpu(), np.random.default_rng(5))
    want = reference.backward(*(a.numpy().astype(np.float32) for a in args[:5]))[0]

    def dx_error(mod) -> float:
        dx = timing.run_once(tvm.compile(mod, target=llvm).mod, "main", args, [5])[0].astype(np.float32)
        return float(np.abs(dx - want).max() / np.abs(want).max())

    designs = context.space_generator.generate_design_space(context.mod)
    for design in designs:
        raw = tvm.s_tir.Schedule(context.mod)
        design.trace.apply_to_schedule(raw, remove_postproc=True)
        try:
            assert not dx_error(raw.mod) < 2e-2
        except tvm.error.InternalError as err:
            assert "occurred before its declaration" in str(err)
        sch = tvm.s_tir.Schedule(context.mod)
        design.trace.apply_to_schedule(sch, remove_postproc=True)
        assert all(p.apply(sch) for p in context.space_generator.postprocs)
        assert dx_error(sch.mod) < 2e-2


@pytest.mark.parametrize("rows_per_step", [1, 2])
def test_shared_accumulators_use_dynamic_shared_memory(rows_per_step):
    """shared_acc=1 puts dgamma/dbeta (2 x 16384 fp32 = 128 KB, past the 48 KB static limit) in
    dynamic shared memory, leaving registers for the rows."""
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 16384, "bfloat16", rules.parts_for(target, 16384, "bfloat16"))
    base = database.baseline_knobs(kernel, target)
    registers = _cuda_source(kernel, {**base, "rows_per_step": rows_per_step, "explicit_unroll": 0})
    shared = _cuda_source(kernel, {**base, "rows_per_step": rows_per_step, "explicit_unroll": 0, "shared_acc": 1})
    assert "extern __shared__" not in registers and "extern __shared__" in shared


def test_rocm_takes_cuda_selected_knobs_but_not_the_nvcc_ones(tmp_path, monkeypatch):
    """Rows per step, who unrolls and shared accumulators were measured with nvcc: not carried over."""
    cuda, rocm = get_target("cuda-sm90"), get_target("rocm-gfx942")
    parts = rules.parts_for(cuda, 768, "bfloat16")
    variant = {"cache_rows": 1, "cache_gamma": 0, "chunked": 1, "rows_per_step": 2, "explicit_unroll": 0}
    variant = {**variant, "shared_acc": 0, "threads": 96, "unroll": 16}
    selection = {Kernel("backward", 768, "bfloat16", parts).name: {"choice": "variant", "knobs": variant}}
    (tmp_path / cuda.name).mkdir()
    (tmp_path / cuda.name / "selection.json").write_text(json.dumps(selection))
    monkeypatch.setattr(database, "TUNING_LOGS", tmp_path)
    kernel = Kernel("backward", 768, "bfloat16", rules.parts_for(rocm, 768, "bfloat16"))
    choice = database.choose(kernel, rocm, records={}, selection={})
    assert choice.source.startswith("transfer:cuda-sm90:untimed:selected")
    assert choice.knobs["threads"] == 96 and choice.knobs["unroll"] == 16
    assert (choice.knobs["rows_per_step"], choice.knobs["explicit_unroll"]) == (1, 1)


def test_single_row_chunks_split_the_rows_evenly_and_keep_one_row_a_step():
    """granule 1: chunks of ceil(M / P) rows (41 rows over 4 chunks: 11, 11, 11, 8, where the default
    rounds to 12, 12, 12, 5), each partial row the sum over exactly its chunk; dx is the same bits;
    two rows a step are not offered (they need chunks of even rows)."""
    target = get_target("llvm")
    rows, hidden, parts = 41, 64, 4
    even, single = Kernel("backward", hidden, "float32", parts), Kernel("backward", hidden, "float32", parts, 1)
    assert single.name == even.name + "g1" and single.tensors()[6].shape[0] == parts
    assert backward.steps_for(single) == (1,) and backward.steps_for(even) == (1, 2)
    sm90 = get_target("cuda-sm90")
    found = variants.variants(single, sm90, database.baseline_knobs(single, sm90))
    assert found and all(v["rows_per_step"] == 1 for v in found)
    with pytest.raises(ValueError, match="granule"):
        Kernel("backward_sum", hidden, "float32", parts, 1)
    args = select.device_arguments(even, rows, tvm.cpu(), np.random.default_rng(0))
    dy, x, mean, rstd = (a.numpy().astype(np.float64) for a in args[:4])
    xhat = (x - mean[:, None]) * rstd[:, None]
    outputs = []
    for kernel in (even, single):
        lib = kernel_library(kernel, target)
        outputs.append(timing.run_once(lib.mod, kernel.name, args, [5, 6, 7]))
    assert np.array_equal(outputs[0][0], outputs[1][0])  # dx
    for (_, dgamma_part, dbeta_part), chunk in zip(outputs, (12, 11), strict=True):
        for p in range(parts):
            chunk_rows = slice(p * chunk, min(rows, (p + 1) * chunk))
            want_g, want_b = (dy[chunk_rows] * xhat[chunk_rows]).sum(0), dy[chunk_rows].sum(0)
            assert np.allclose(dgamma_part[p], want_g, rtol=1e-5, atol=1e-4), (chunk, p)
            assert np.allclose(dbeta_part[p], want_b, rtol=1e-5, atol=1e-4), (chunk, p)


def test_knob_sets_hold_every_baseline_and_variant():
    """The typed knob sets (schedules.knob_sets) name exactly the knobs each GPU family picks: every
    baseline and every variant select times converts to one and back unchanged."""
    from schedules.knob_sets import GPU_KNOB_SETS, BackwardKnobs

    for name in ("cuda-sm90", "rocm-gfx942"):
        target = get_target(name)
        for kernel in kernels_for(8192, "bfloat16", target, parts=132, granule=2):
            family = GPU_KNOB_SETS[kernel.op]
            base = database.baseline_knobs(kernel, target)
            for knobs in [base, *variants.variants(kernel, target, base)]:
                assert family.from_dict(knobs).to_dict() == knobs
    with pytest.raises(ValueError, match="BackwardKnobs takes"):
        BackwardKnobs.from_dict({"threads": 128})
