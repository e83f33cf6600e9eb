"""The rule for hidden sizes nobody tuned (schedules.untuned): CPU-only checks against the committed
cuda-sm90 selection.json and small made-up ones."""

import json
import warnings

import pytest

from lntune.build import export, kernels_for
from schedules import database, rules, untuned
from schedules.targets import get_target
from te_ops.layer_norm import Kernel

SM90 = get_target("cuda-sm90")
TUNED = (768, 1024, 2048, 4096, 5120, 8192, 16384)


@pytest.fixture(scope="module")
def committed():
    folder = database.TUNING_LOGS / SM90.name
    return database.read_records(folder), database.read_selection(folder)


@pytest.mark.parametrize(
    "hidden,dtype,source",
    [(1536, "bfloat16", 2048), (3072, "float16", 4096), (6144, "float32", 5120), (12288, "bfloat16", 16384)],
)
def test_an_untuned_n_takes_the_nearest_tuned_ns_scaled_knobs(committed, hidden, dtype, source):
    records, selection = committed
    parts, granule = database.selected_chunking(SM90, hidden, dtype, selection)
    assert database.parts_key(hidden, dtype) not in selection
    kernels = kernels_for(hidden, dtype, SM90, parts, granule)
    backward = next(k for k in kernels if k.op == "backward")
    choice = database.choose(backward, SM90, records, selection)
    assert choice.source.startswith(f"rule:nearest-n{source}:selected:"), choice.source
    # Valid: the design space takes every knob as given, and it fits registers and shared memory.
    assert database.exact_knobs(backward, SM90, choice.knobs) == choice.knobs
    assert untuned.fits_budget(backward, SM90, choice.knobs)
    assert choice.knobs != database.baseline_knobs(backward, SM90)
    # As many elements a thread (of its block's columns) as the tuned N's kernel.
    tuned_parts, tuned_granule = database.selected_chunking(SM90, source, dtype, selection)
    tuned = database.choose(Kernel("backward", source, dtype, tuned_parts, tuned_granule), SM90, records, selection)
    split = choice.knobs["cluster"] or 1
    assert split == (tuned.knobs["cluster"] or 1)
    assert hidden // split // choice.knobs["threads"] == source // split // tuned.knobs["threads"]
    assert parts in rules.parts_candidates(SM90, split)


def test_the_rule_is_deterministic(committed):
    records, selection = committed
    kernel = Kernel("backward", 3072, "bfloat16", *database.selected_chunking(SM90, 3072, "bfloat16", selection))
    first = database.choose(kernel, SM90, records, selection)
    database._RULE_SOURCES.clear()
    again = database.choose(kernel, SM90, records, json.loads(json.dumps(selection)))
    assert (first.knobs, first.source) == (again.knobs, again.source)


def test_tuned_sizes_keep_their_own_choices(committed):
    """The rule never touches an N select ruled on: its chunking is the recorded one and no kernel
    (forward and statistics, baselines there, included) says rule."""
    records, selection = committed
    for dtype in ("float32", "bfloat16", "float16"):
        assert untuned.tuned_hiddens(SM90, dtype, selection) == list(TUNED)
        for n in TUNED:
            entry = selection[database.parts_key(n, dtype)]
            assert database.selected_chunking(SM90, n, dtype, selection) == (entry["parts"], entry.get("granule", 2))
            for kernel in kernels_for(n, dtype, SM90):
                source = database.choose(kernel, SM90, records, selection).source
                assert "rule" not in source, (kernel.name, source)


def test_the_rule_is_cuda_only(committed):
    records, selection = committed
    for name in ("llvm", "rocm-gfx942"):
        target = get_target(name)
        kernel = Kernel("backward", 3072, "float16", rules.parts_for(target, 3072, "float16"))
        assert database.choose(kernel, target, records, selection).source == "baseline"
    assert database.selected_chunking(get_target("llvm"), 3072, "float16", selection) == (16, 2)


@pytest.mark.parametrize("hidden", [1, 7, 128, 1000, 2000, 3000, 24576, 32768])
def test_odd_and_far_sizes_choose_without_failing(committed, hidden):
    records, selection = committed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in ("float32", "bfloat16", "float16"):
            chunking = database.selected_chunking(SM90, hidden, dtype, selection)
            for kernel in kernels_for(
                hidden, dtype, SM90, *chunking, param_dtype="float32" if dtype != "float32" else None
            ):
                choice = database.choose(kernel, SM90, records, selection)
                assert choice.source.startswith(("rule:", "baseline", "transfer:")), choice.source
                assert database.exact_knobs(kernel, SM90, choice.knobs) == choice.knobs


def _only_n8192(selection: dict) -> dict:
    """A selection in which bfloat16 was tuned at N = 8192 only (one block a row, 8 elements a
    thread at 1024 threads): at N = 16384 a thread would hold 16, past the register file."""
    kernel = Kernel("backward", 8192, "bfloat16", *database.selected_chunking(SM90, 8192, "bfloat16", selection))
    return {database.parts_key(8192, "bfloat16"): selection[database.parts_key(8192, "bfloat16")]} | {
        kernel.name: selection[kernel.name]
    }


def test_no_valid_transfer_falls_back_to_the_baseline_and_says_so(committed, tmp_path):
    records, selection = committed
    only = _only_n8192(selection)
    assert untuned.tuned_hiddens(SM90, "bfloat16", only) == [8192]
    assert database.rule_source(SM90, 16384, "bfloat16", only, records) is None
    assert database.selected_chunking(SM90, 16384, "bfloat16", only) == (rules.parts_for(SM90, 16384, "bfloat16"), 2)
    folder = tmp_path / "logs" / SM90.name
    folder.mkdir(parents=True)
    (folder / "selection.json").write_text(json.dumps(only))
    manifest = export(
        SM90.name, [16384], ["bfloat16"], tmp_path / "out", logs_dir=tmp_path / "logs", log=lambda *_: None
    )
    schedules = {v["op"]: v["schedule"] for v in manifest["variants"]}
    assert schedules["backward"] == "baseline (rule: no tuned N's knobs fit; tried n8192)", schedules
    for variant in manifest["variants"]:
        kernel = Kernel(variant["op"], 16384, "bfloat16", variant["parts"], variant["granule"])
        assert variant["knobs"] == database.baseline_knobs(kernel, SM90)


def test_export_names_the_rule_in_the_manifest(tmp_path):
    manifest = export(SM90.name, [3072], ["bfloat16", "bfloat16:float32"], tmp_path, log=lambda *_: None)
    by = {(v["op"], v["param_dtype"]): v for v in manifest["variants"]}
    assert by["backward", "bfloat16"]["schedule"].startswith("rule:nearest-n4096:selected:")
    assert by["backward_sum", "bfloat16"]["schedule"].startswith("rule:nearest-n4096:selected:")
    assert by["forward", "bfloat16"]["schedule"] == "baseline (rule: nearest-n4096, whose forward is the baseline)"
    mixed = by["backward", "float32"]
    assert mixed["schedule"].startswith("transfer:bfloat16-params:rule:nearest-n4096:")
    assert mixed["knobs"] == by["backward", "bfloat16"]["knobs"]
    assert by["backward", "bfloat16"]["parts"] == 264  # P fitted over N = 2048, 4096 and 5120
