"""ROCm libraries built on this CPU machine: every variant exports, and the ISA is what the design
spaces intend (16-byte global loads, no scratch, registers and LDS leaving room for several waves)."""

import pytest

from lntune import isa, toolchain
from lntune.build import export
from lntune.cli import main


@pytest.fixture(scope="module")
def rocm_library(tmp_path_factory):
    try:
        toolchain.prepare_rocm()
    except RuntimeError as err:
        pytest.skip(str(err))
    if not isa.llvm_tool("llvm-objdump"):
        pytest.skip("needs llvm-objdump 17+ for gfx942 (Debian: apt-get install llvm-19)")
    out = tmp_path_factory.mktemp("rocm")
    manifest = export("rocm-gfx942", [768, 4096, 8192], ["float32", "bfloat16"], out, log=lambda *_: None)
    return out, manifest


def test_every_kernel_has_a_code_object_entry(rocm_library):
    out, manifest = rocm_library
    facts = isa.library_facts(out / "lntune.so", "gfx942")
    assert {v["function"] for v in manifest["variants"]} <= set(facts)


def test_main_kernels_use_16_byte_loads_and_no_scratch(rocm_library):
    out, manifest = rocm_library
    facts = isa.library_facts(out / "lntune.so", "gfx942")
    for v in manifest["variants"]:
        f = facts[v["function"]]
        assert f["private"] == 0 and f["vgpr_spills"] == 0 and f["sgpr_spills"] == 0, (v["function"], f)
        assert f["lds"] <= 65536
        if v["op"] != "backward_sum":
            assert f["dwordx4_loads"] >= 1, (v["function"], f)
            assert f["waves_per_simd"] >= 2, (v["function"], f)


def test_backward_starts_from_cuda_tuned_knobs(rocm_library):
    _, manifest = rocm_library
    sources = {v["function"]: v["schedule"] for v in manifest["variants"] if v["op"] == "backward"}
    assert any(s.startswith("transfer:cuda-sm90:untimed") for s in sources.values()), sources


def test_inspect_prints_the_isa_table(rocm_library, capsys):
    out, _ = rocm_library
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "x4 loads" in text and "waves/SIMD" in text
    assert sum(line.startswith("lntune_") for line in text.splitlines()) == 24
