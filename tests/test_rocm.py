"""ROCm libraries built on this CPU machine: every variant exports, and the ISA is what the design
spaces intend (16-byte global loads, no scratch, registers and LDS leaving room for several waves)."""

import pytest

from lntune import isa, toolchain
from lntune.build import export
from lntune.cli import main

HIDDEN = [768, 1024, 2048, 4096, 5120, 8192, 16384]
DTYPES = ["float32", "float16", "bfloat16"]


@pytest.fixture(scope="module", params=["rocm-gfx942", "rocm-gfx90a"])
def rocm_library(request, tmp_path_factory):
    """Every variant of the tuning set, exported for the target on this CPU-only machine."""
    try:
        toolchain.prepare_rocm()
    except RuntimeError as err:
        pytest.skip(str(err))
    if not isa.llvm_tool("llvm-objdump"):
        pytest.skip("needs llvm-objdump 17+ for gfx942 (Debian: apt-get install llvm-19)")
    out = tmp_path_factory.mktemp(request.param)
    manifest = export(request.param, HIDDEN, DTYPES, out, log=lambda *_: None)
    return out, manifest


def test_every_kernel_has_a_code_object_entry(rocm_library):
    out, manifest = rocm_library
    facts = isa.library_facts(out / "lntune.so", manifest["target_spec"]["mcpu"])
    assert len(manifest["variants"]) == 4 * len(HIDDEN) * len(DTYPES)
    assert {v["function"] for v in manifest["variants"]} <= set(facts)


def test_main_kernels_use_16_byte_loads_and_no_scratch(rocm_library):
    out, manifest = rocm_library
    facts = isa.library_facts(out / "lntune.so", manifest["target_spec"]["mcpu"])
    for v in manifest["variants"]:
        f = facts[v["function"]]
        assert f["private"] == 0 and f["vgpr_spills"] == 0 and f["sgpr_spills"] == 0, (v["function"], f)
        assert f["lds"] <= 65536
        if v["op"] != "backward_sum":
            assert f["dwordx4_loads"] >= 1, (v["function"], f)
        # Row-wise kernels: at least two waves per SIMD to hide latency. The one-pass backward keeps
        # a row and its partial sums in registers by design: it must still fit a workgroup per CU.
        if v["op"].startswith("forward"):
            assert f["waves_per_simd"] >= 2, (v["function"], f)
        assert f["groups_per_cu"] >= 1, (v["function"], f)


def test_backward_starts_from_cuda_tuned_knobs(rocm_library):
    _, manifest = rocm_library
    sources = {v["function"]: v["schedule"] for v in manifest["variants"] if v["op"] == "backward"}
    assert any(s.startswith("transfer:cuda-sm90:untimed") for s in sources.values()), sources


def test_inspect_prints_the_isa_table(rocm_library, capsys):
    out, _ = rocm_library
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "x4 loads" in text and "waves/SIMD" in text
    assert sum(line.startswith("lntune_") for line in text.splitlines()) == 4 * len(HIDDEN) * len(DTYPES)
