"""`lntune select` on the CPU: candidates, the agreement check, verdicts, and what export does with them."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import tvm

from lntune import load
from lntune import select as sel
from lntune.build import export, kernels_for
from lntune.check import check_variant
from schedules import database, rules
from schedules.targets import get_target
from te_ops.layer_norm import Kernel


def _cpu_backward(hidden: int = 64, dtype: str = "float32") -> Kernel:
    return next(k for k in kernels_for(hidden, dtype, get_target("llvm")) if k.op == "backward")


def test_cuda_backward_candidates_are_unique_and_start_with_the_baseline():
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 8192, "bfloat16", rules.parts_for(target, 8192, "bfloat16"))
    labelled, _source = sel.candidates(kernel, target, records={})
    assert next(iter(labelled)) == "baseline"
    knobs = list(labelled.values())
    assert len(knobs) == len({json.dumps(k, sort_keys=True) for k in knobs}) > 20
    assert {k["cache_rows"] for k in knobs} == {0, 1}  # past 8192 columns rows may be re-read


def test_partials_sum_candidates_are_every_split_that_fits_a_block():
    target = get_target("cuda-sm90")
    kernel = Kernel("backward_sum", 16384, "float32", rules.parts_for(target, 16384, "float32"))
    labelled, _source = sel.candidates(kernel, target, records={})
    splits = {(k["threads"], k["lanes"]) for k in labelled.values()}
    assert len(splits) == len(labelled) == 33 and all(c * lanes <= 1024 for c, lanes in splits)
    # The first grid's 18 splits keep the labels committed selections name.
    first = [(k["threads"], k["lanes"]) for k in list(labelled.values())[:18]]
    assert {c for c, _ in first} == {32, 64, 128, 256} and max(lanes for _, lanes in first) == 32
    for knobs in labelled.values():  # each passes TVM's GPU checks
        mod = tvm.IRModule({kernel.name: database.scheduled(kernel, target, knobs)})
        tvm.compile(mod, target=tvm.target.Target(target.spec, host="llvm"))


def test_select_rejects_an_unknown_op_before_doing_anything():
    with pytest.raises(ValueError, match="ops: expected some of forward.*got backwards"):
        sel.select("cuda-sm90", [1024], ["float32"], ops=["backwards"])


def test_forward_without_a_record_has_nothing_to_select():
    target = get_target("cuda-sm90")
    labelled, source = sel.candidates(Kernel("forward", 1024, "float32"), target, records={})
    assert list(labelled) == ["baseline"] and source == "baseline"


class _SkipsItsOutputs:
    """A loaded module whose kernel returns without writing anything."""

    def __getitem__(self, name):
        return lambda *args: None


def test_measure_leaves_out_a_candidate_that_does_not_write_its_outputs(tmp_path, monkeypatch):
    target = get_target("llvm")
    kernel = _cpu_backward()
    base = database.baseline_knobs(kernel, target)
    plan = {kernel: {"baseline": base, "two_rows": {**base, "rows_per_step": 2}}}
    paths = {label: path for (_, label), path in sel._build_all(target, plan, str(tmp_path), print).items()}
    paths["lazy"] = "lazy.so"
    real_load = tvm.runtime.load_module
    monkeypatch.setattr(tvm.runtime, "load_module", lambda p: _SkipsItsOutputs() if p == "lazy.so" else real_load(p))
    notes = []
    times = sel._measure(kernel, paths, 37, tvm.cpu(), np.random.default_rng(3), notes.append)
    assert set(times) == {"baseline", "two_rows"} and all(t > 0 for t in times.values())
    assert notes and "lazy: left out" in notes[0] and "nan" in notes[0]


def test_verdict_names_the_fastest_and_keeps_every_timing():
    labelled = {"baseline": {"threads": 64}, "tuned": {"threads": 128}, "variant3": {"threads": 32}}
    timed = sel.Timed(None, 1000, {"baseline": 3.0, "tuned": 2.5, "variant3": 2.0})
    entry = sel.verdict(labelled, timed, "tuned:1:line2:1.0us")
    assert entry["choice"] == "variant" and entry["label"] == "variant3" and entry["knobs"] == {"threads": 32}
    assert list(entry["us"]) == ["variant3", "tuned", "baseline"] and "small" not in entry
    assert sel.verdict(labelled, sel.Timed(None, 1000, {"baseline": 1.0, "tuned": 2.0}), "")["choice"] == "baseline"


def test_verdict_without_small_m_timings_gives_a_tie_to_the_block_with_more_threads():
    """Within TIE of the fastest the most threads win (small M has no other parallelism); beyond it, time."""
    labelled = {"baseline": {"threads": 512}, "variant1": {"threads": 128}, "variant2": {"threads": 256}}
    close = {"baseline": 101.0, "variant1": 100.0, "variant2": 100.5}
    assert sel.verdict(labelled, sel.Timed(None, 1000, close), "")["label"] == "baseline"
    far = {"baseline": 100.0 * (1 + sel.TIE) + 0.5, "variant1": 100.0, "variant2": 100.5}
    assert sel.verdict(labelled, sel.Timed(None, 1000, far), "")["label"] == "variant2"


def test_verdict_settles_a_tie_by_the_small_m_timings():
    """Tied at the large M, the fastest at small M wins; tied there too, the faster at the large M."""
    labelled = {"baseline": {"threads": 512}, "variant1": {"threads": 128}, "variant2": {"threads": 256}}
    large = {"baseline": 101.0, "variant1": 100.0, "variant2": 100.5, "variant9": 150.0}
    labelled["variant9"] = {"threads": 64}
    small = {"variant1": 9.0, "variant2": 6.0, "baseline": 6.1}
    entry = sel.verdict(labelled, sel.Timed(None, 4096, large, sel.SMALL_ROWS, small), "")
    assert entry["label"] == "variant2" and entry["small"] == {"rows": sel.SMALL_ROWS, "us": small}
    assert sel.tied(large) == ["variant1", "variant2", "baseline"]


def test_a_cuda_candidate_with_a_large_stack_frame_is_left_out(tmp_path):
    """ptxas's stack frame decides: an interleaved 16-bit row cache of 4096 columns over 256 threads,
    prefetched, went to local memory (8 KB a thread) and is not built; the committed choice is."""
    if not shutil.which("nvcc"):
        pytest.skip("needs nvcc for ptxas's report")
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 4096, "bfloat16", 264)
    today = database.choose(kernel, target).knobs
    spilled = {**today, "threads": 256, "chunked": 0, "prefetch": 2, "threads_per_sm": 0, "unroll": 64}
    path, why = sel._build((kernel, target.name, spilled, str(tmp_path / "spilled.so")))
    assert path == "" and "stack frame" in why and int(why.split("-byte")[0]) > sel.STACK_LIMIT
    path, why = sel._build((kernel, target.name, today, str(tmp_path / "today.so")))
    assert why == "" and path


@pytest.mark.parametrize(
    "dtype,changed",
    [
        ("float32", {"rows_per_step": 2}),
        ("bfloat16", {"rows_per_step": 2}),
        ("float32", {"rows_per_step": 2, "stage_rows": 1}),
        ("float16", {"stage_rows": 1}),
        ("float32", {"stage_rows": 2}),
        ("float16", {"stage_rows": 2, "rows_per_step": 2}),
        ("float32", {"row_scalars": 1}),
        ("float16", {"row_scalars": 1, "rows_per_step": 2, "stage_rows": 1}),
    ],
)
def test_a_selected_backward_variant_is_exported_and_correct(tmp_path, dtype, changed):
    """Two rows a step, staged rows and per-row scalars, through selection.json and export, at row
    counts that end a chunk mid-step."""
    target = get_target("llvm")
    kernel = _cpu_backward(dtype=dtype)
    # On the CPU baseline's cached rows and gamma (since it re-reads them, staging needs them set).
    knobs = {**database.baseline_knobs(kernel, target), "cache_rows": 1, "cache_gamma": 1, **changed}
    (tmp_path / "logs" / "llvm").mkdir(parents=True)
    selection = {kernel.name: {"choice": "variant", "label": "variant1", "knobs": knobs, "us": {"variant1": 1.0}}}
    (tmp_path / "logs" / "llvm" / "selection.json").write_text(json.dumps(selection))
    manifest = export("llvm", [64], [dtype], tmp_path / "lib", logs_dir=tmp_path / "logs", log=lambda *_: None)
    entry = next(v for v in manifest["variants"] if v["function"] == kernel.name)
    assert entry["schedule"].startswith("selected:variant1")
    assert all(entry["knobs"][name] == value for name, value in changed.items())
    lib = load(tmp_path / "lib")
    for rows in (1, 3, 37, 101):
        bad = [r for r in check_variant(lib, 64, dtype, rows, np.random.default_rng()) if not r.ok]
        assert not bad, [(r.op, r.output, r.error) for r in bad]


def test_time_plan_takes_the_next_built_candidate_as_reference_and_skips_a_kernel_with_none(monkeypatch):
    """A baseline left out (say for its stack frame) hands the reference to the next candidate
    that built (select puts today's choice there); a kernel with nothing built is not timed."""
    target = get_target("llvm")
    kernel = _cpu_backward()
    base = database.baseline_knobs(kernel, target)
    unbuilt = Kernel("backward", 48, "float32", 16)
    two_rows = {**base, "rows_per_step": 2}
    no_baseline = replace(kernel, parts=8)
    plan = {
        kernel: {"baseline": base, "two_rows": two_rows},
        unbuilt: {"baseline": base},
        no_baseline: {"baseline": base, "two_rows": two_rows},
    }
    build_all = sel._build_all

    def without_some(target, plan, folder, log):
        built = build_all(target, plan, folder, log)
        return {key: path for key, path in built.items() if key[0] != unbuilt and key != (no_baseline, "baseline")}

    monkeypatch.setattr(sel, "_build_all", without_some)
    notes = []
    timed = list(sel.time_plan(target, plan, elements=64 * 37, log=notes.append))
    assert [(t.kernel, t.rows, sorted(t.us), t.small_us) for t in timed] == [
        (kernel, 37, ["baseline", "two_rows"], {}),
        (no_baseline, 37, ["two_rows"], {}),
    ]
    assert any(unbuilt.name in note and "no candidate built" in note for note in notes)
    assert any(no_baseline.name in note and "two_rows is the reference" in note for note in notes)


def test_time_plan_times_only_the_tied_candidates_again_at_small_m(monkeypatch):
    target = get_target("llvm")
    kernel = _cpu_backward()
    base = database.baseline_knobs(kernel, target)
    plan = {kernel: {"baseline": base, "close": base, "far": base}}
    large = {"baseline": 100.0, "close": 100.0 * (1 + sel.TIE), "far": 100.0 * (1 + sel.TIE) + 0.1}
    calls = []

    def fake_measure(kernel, paths, rows, device, rng, log, backward_path=""):
        calls.append((rows, sorted(paths)))
        return {label: large[label] if rows == 37 else 1.0 for label in paths}

    monkeypatch.setattr(sel, "_measure", fake_measure)
    (timed,) = sel.time_plan(target, plan, elements=64 * 37, small_rows=5)
    assert calls == [(37, ["baseline", "close", "far"]), (5, ["baseline", "close"])]
    assert timed.small_rows == 5 and timed.small_us == {"baseline": 1.0, "close": 1.0}


def test_a_partials_sum_is_timed_after_the_backward_that_writes_its_partials(monkeypatch):
    """The sum's candidates run right after today's backward, on the partials it just wrote, and
    are not timed again at small M (their time does not depend on M)."""
    target = get_target("llvm")
    kernel = Kernel("backward_sum", 64, "float32", 16)
    base = database.baseline_knobs(kernel, target)
    pairs = []

    def spy(*args):
        pairs.append(real(*args))
        return pairs[-1]

    real = sel._after_backward
    monkeypatch.setattr(sel, "_after_backward", spy)
    (timed,) = sel.time_plan(target, {kernel: {"baseline": base, "again": base}}, elements=64 * 40, small_rows=5)
    assert set(timed.us) == {"baseline", "again"} and not timed.small_us
    ((sum_args, backward),) = pairs
    for partials in sum_args[:2]:
        partials.copyfrom(np.full(partials.shape, np.nan, dtype="float32"))
    backward()
    assert all(np.isfinite(partials.numpy()).all() for partials in sum_args[:2])


def test_select_parts_keeps_the_fastest_p_and_export_builds_at_it(tmp_path, monkeypatch):
    """select --parts on the CPU over two P and both chunk granules (today's knobs take one row a
    step): the verdict is the least total, and export, kernels_for and the runner all take that P
    and granule, with correct results where chunks end mid-matrix."""
    (tmp_path / "llvm").mkdir()
    monkeypatch.setattr(database, "TUNING_LOGS", tmp_path)
    monkeypatch.setattr(rules, "parts_candidates", lambda target, blocks=1: [16, 6])
    sel.select_parts("llvm", [64], ["float32"], elements=64 * 40, log=lambda *_: None)
    selection = json.loads((tmp_path / "llvm" / "selection.json").read_text())
    entry = selection[database.parts_key(64, "float32")]
    assert set(entry["us"]) == {"16", "6", "16g1", "6g1"}
    chosen, granule = entry["parts"], entry["granule"]
    assert entry["us"][sel._chunking_label(chosen, granule)] == min(entry["us"].values())
    assert [sel.parse_chunking(label) for label in ("6g1", "16")] == [(6, 1), (16, 2)]
    target = get_target("llvm")
    kernels = [k for k in kernels_for(64, "float32", target) if k.parts]
    assert [(k.parts, k.granule) for k in kernels] == [(chosen, granule), (chosen, 2)]
    manifest = export("llvm", [64], ["float32"], tmp_path / "lib", logs_dir=tmp_path, log=lambda *_: None)
    backward = next(v for v in manifest["variants"] if v["op"] == "backward")
    assert backward["parts"] == chosen and backward["schedule"].startswith("selected:today")
    assert backward["function"] == kernels[0].name
    # Both granules, whichever won: export, the runner and the results (41 rows: chunks end mid-matrix).
    for granule in (1, 2):
        entry["granule"] = granule
        (tmp_path / "llvm" / "selection.json").write_text(json.dumps(selection))
        manifest = export("llvm", [64], ["float32"], tmp_path / f"lib{granule}", logs_dir=tmp_path, log=lambda *_: None)
        assert {(v["op"], v["granule"]) for v in manifest["variants"] if v["parts"]} == {
            ("backward", granule),
            ("backward_sum", 2),
        }
        lib = load(tmp_path / f"lib{granule}")
        for rows in (1, 7, 41):
            bad = [r for r in check_variant(lib, 64, "float32", rows, np.random.default_rng()) if not r.ok]
            assert not bad, [(granule, r.op, r.output, r.error) for r in bad]


def test_focus_keeps_the_baseline_todays_choice_and_the_variants_setting_the_knob():
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 4096, "bfloat16", 264)
    everything, _ = sel.candidates(kernel, target, records={})
    today = everything["variant3"]
    staged, _ = sel.candidates(kernel, target, {}, focus="stage_rows=2", selected=today)
    assert {"baseline", "variant3"} <= set(staged) and len(staged) < len(everything)
    assert all(k["stage_rows"] == 2 for label, k in staged.items() if label not in ("baseline", "variant3"))
    any_stage, _ = sel.candidates(kernel, target, {}, focus="stage_rows", selected=today)
    assert set(staged) < set(any_stage)


def test_focus_with_a_value_also_times_todays_choice_set_to_it():
    """focus=knob=value adds today's choice with that value when no variant has it, and only when
    its space offers the value (shared accumulators rule prefetching out)."""
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 8192, "bfloat16", 132)
    everything, _ = sel.candidates(kernel, target, records={})
    staged = next(k for k in everything.values() if k["stage_rows"] and not k["prefetch"])
    today = {**staged, "unroll": 16}  # no variant has this unrolling
    ahead, _ = sel.candidates(kernel, target, {}, focus="prefetch=2", selected=today)
    assert ahead["selected+prefetch=2"] == {**today, "prefetch": 2}
    shared = next(k for k in everything.values() if k["shared_acc"])
    ruled_out, _ = sel.candidates(kernel, target, {}, focus="prefetch=2", selected=shared)
    assert "selected+prefetch=2" not in ruled_out


def test_focus_on_several_knobs_keeps_the_variants_setting_all_of_them():
    """stage_rows=2,prefetch=1: only candidates with both (staged rows prefetched), today's choice
    with both set, and today's choice itself (which no variant is), so the verdict can keep it."""
    target = get_target("cuda-sm90")
    kernel = Kernel("backward", 8192, "bfloat16", 132)
    everything, _ = sel.candidates(kernel, target, records={})
    today = {**next(k for k in everything.values() if not k["stage_rows"] and not k["prefetch"]), "unroll": 16}
    both, _ = sel.candidates(kernel, target, {}, focus="stage_rows=2,prefetch=1", selected=today)
    assert both["selected"] == today and today not in everything.values()
    focused = [k for label, k in both.items() if label not in ("baseline", "selected")]
    assert len(focused) > 10
    assert all(k["stage_rows"] == 2 and k["prefetch"] == 1 for k in focused)
    assert both["selected+stage_rows=2,prefetch=1"] == {**today, "stage_rows": 2, "prefetch": 1}


def test_every_committed_cuda_backward_choice_keeps_its_rows_out_of_local_memory():
    """What select checks per candidate holds for the committed selection: ptxas gives no selected
    CUDA backward a stack frame past STACK_LIMIT (a row cache in local memory)."""
    if not shutil.which("nvcc"):
        pytest.skip("needs nvcc for ptxas's report")
    from lntune.build import compile_module
    from lntune.inspect import built_cuda_source, compile_cubin, cubin_resources, ptxas_report

    target = get_target("cuda-sm90")
    mod = tvm.IRModule()
    for n in (768, 1024, 2048, 4096, 5120, 8192, 16384):
        for dtype in ("float32", "bfloat16", "float16"):
            kernel = next(k for k in kernels_for(n, dtype, target) if k.op == "backward")
            mod[kernel.name] = database.scheduled(kernel, target, database.choose(kernel, target).knobs)
    source = built_cuda_source(compile_module(mod, target))
    cubin, report = compile_cubin(source, "sm_90")
    resources = ptxas_report(report)
    frames = {name: facts["stack"] for name, facts in resources.items()}
    assert len(frames) == 21 and max(frames.values()) <= sel.STACK_LIMIT, frames
    # The cubin reader select uses on a GPU host (no second compile) gives ptxas's figures.
    read = cubin_resources(cubin)
    assert read == {name: {"registers": f["registers"], "stack": f["stack"]} for name, f in resources.items()}


def test_select_on_the_cpu_times_the_previous_choice_and_writes_the_verdict(tmp_path, monkeypatch):
    """select end to end with two backward candidates: the log names the previous choice and the
    winner with their times, and selection.json gets the verdict."""
    (tmp_path / "llvm").mkdir()
    monkeypatch.setattr(database, "TUNING_LOGS", tmp_path)

    def two_for_the_backward(kernel, target, records, focus=None, selected=None):
        base = database.baseline_knobs(kernel, target)
        extra = {"variant1": {**base, "rows_per_step": 2}} if kernel.op == "backward" else {}
        return {"baseline": base, **extra}, "baseline"

    monkeypatch.setattr(sel, "candidates", two_for_the_backward)
    notes = []
    sel.select("llvm", [64], ["float32"], elements=64 * 41, log=notes.append)
    kernel = _cpu_backward()
    (line,) = [note for note in notes if note.startswith(kernel.name)]
    assert "previous baseline" in line and "-> " in line and "2 timed" in line
    entry = json.loads((tmp_path / "llvm" / "selection.json").read_text())[kernel.name]
    assert entry["label"] in ("baseline", "variant1") and set(entry["us"]) == {"baseline", "variant1"}
    assert entry["rows"] == 41


def test_parallel_select_merges_each_jobs_changes_and_reports_a_clash(tmp_path):
    """bench/parallel_select.sh on the CPU (llvm, two stand-in GPUs): each job selects in its own copy
    of the checkout, the changed entries land in this one, and a kernel two jobs changed is reported."""
    import os
    import subprocess
    import sys

    root = tmp_path / "repo"
    for part in ("lntune", "schedules", "te_ops", "bench"):
        shutil.copytree(database.ROOT / part, root / part, ignore=shutil.ignore_patterns("results", "__pycache__"))
    (root / "tuning_logs" / "llvm").mkdir(parents=True)
    (root / "tuning_logs" / "llvm" / "selection.json").write_text("{}\n")
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (tools / "python3").chmod(0o755)
    (tools / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: stand-in'\necho 'GPU 1: stand-in'\n")
    (tools / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{tools}:{os.environ['PATH']}", TARGET="llvm", OUT=str(tmp_path / "out"))
    env.update(WORK=str(tmp_path / "work"), PYTHONPATH="")
    n64 = "--parts --hidden 64 --dtype float32 --elements 2560"
    jobs = [n64, f"{n64}; --parts --hidden 128 --dtype float32 --elements 5120"]
    done = subprocess.run(
        ["bash", "bench/parallel_select.sh", *jobs], cwd=root, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    merged = json.loads((root / "tuning_logs" / "llvm" / "selection.json").read_text())
    assert {"parts:float32:n64", "parts:float32:n128"} <= set(merged)
    assert "parts:float32:n64: changed by jobs 0 and 1; job 0's entry kept" in done.stdout
    assert "P=" in (tmp_path / "out" / "select-job1.txt").read_text()
    assert json.loads((tmp_path / "out" / "selection.json").read_text()) == merged


def test_p_of_a_cluster_kernel_counts_in_its_blocks():
    """A chunk of a cluster kernel is two blocks: its P candidates start at one block an SM."""
    target = get_target("cuda-sm90")
    single, paired = rules.parts_candidates(target), rules.parts_candidates(target, 2)
    assert paired == [p // 2 for p in single] and paired[0] == target.cores // 2
