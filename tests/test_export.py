"""Export for every target family on this CPU-only machine, and what the libraries hold."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import tvm

from lntune import toolchain
from lntune.build import export
from lntune.cli import main
from lntune.inspect import _cuda_source, cubin_arch, embedded_cubins, embedded_cuda_resources, machine_code
from lntune.select import STACK_LIMIT


def test_cuda_export_embeds_device_code_and_it_compiles(tmp_path):
    """Exported here (nvcc, no CUDA driver) the library holds a cubin for sm_90a (toolchain.cuda_arch)
    with every kernel, not CUDA source; the row caches stay in registers: no stack frame beyond a few
    spilled registers (what select lets through, measured faster)."""
    manifest = export("cuda-sm90", [768, 4096], ["float32", "bfloat16"], tmp_path, log=lambda *_: None)
    assert manifest["device_code"] == "cubin"
    assert len(manifest["variants"]) == 16
    assert {v["op"] for v in manifest["variants"]} == {"forward", "forward_stats", "backward", "backward_sum"}
    blob = (tmp_path / "lntune.so").read_bytes()
    assert machine_code(blob) == "cubin" and _cuda_source(blob) is None
    facts = embedded_cuda_resources(blob)
    assert set(facts) == {v["function"] for v in manifest["variants"]}
    assert all(f["stack"] <= STACK_LIMIT for f in facts.values()), facts
    (cubin,) = embedded_cubins(blob)
    assert cubin_arch(cubin) == "sm_90"  # compiled for sm_90a, whose ELF flags read the same


def test_rocm_export_embeds_hsaco(tmp_path):
    try:
        toolchain.prepare_rocm()
    except RuntimeError as err:
        pytest.skip(str(err))
    manifest = export("rocm-gfx942", [1024], ["float16"], tmp_path, log=lambda *_: None)
    assert manifest["device_code"] == "hsaco"
    blob = (tmp_path / "lntune.so").read_bytes()
    assert b"amdgcn-amd-amdhsa" in blob and b"gfx942" in blob
    assert b"\x7fELF" in blob[16:]  # the hsaco is an ELF inside the host library


def test_export_rejects_a_bad_request(tmp_path):
    with pytest.raises(ValueError, match="target must be one of"):
        export("cuda-sm70", [768], ["float32"], tmp_path)
    with pytest.raises(ValueError, match="dtype must be"):
        export("llvm", [768], ["float64"], tmp_path)
    with pytest.raises(ValueError, match="hidden must be"):
        export("llvm", [0], ["float32"], tmp_path)
    assert not (tmp_path / "lntune.so").exists()


def test_cli_export_then_check(tmp_path, capsys):
    assert (
        main(["export", "--target", "llvm", "--hidden", "64,96", "--dtype", "float32,float16", "-o", str(tmp_path)])
        == 0
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["target"] == "llvm" and manifest["tvm_version"] == tvm.__version__
    assert all(v["schedule"] == "baseline" for v in manifest["variants"])
    assert main(["check", str(tmp_path), "--rows", "1,17"]) == 0
    out = capsys.readouterr().out
    assert "64 passed, 0 failed" in out  # 2 sizes x 2 dtypes x 2 row counts x 8 outputs


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main(["export", "--target", "nope", "--hidden", "64", "-o", str(tmp_path)]) == 2
    assert "error: target must be one of" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing")]) == 2


def test_targets_lists_the_registry(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("llvm", "cuda-sm80", "cuda-sm90", "rocm-gfx90a", "rocm-gfx942"):
        assert name in out


def test_inspect_lists_every_kernel_with_its_resources(tmp_path, capsys):
    export("cuda-sm90", [1024], ["bfloat16"], tmp_path, log=lambda *_: None)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("lntune_")]
    assert len(rows) == 4
    if shutil.which("nvcc"):
        assert all(line.split()[1].isdigit() and line.split()[2] == "0" for line in rows), out


SPILLING_KERNEL = b"""
extern "C" __global__ void spills(float* out, int n) {
  float row[200];
  for (int i = 0; i < 200; ++i) row[i] = out[i * n + threadIdx.x];
  float sum = 0.0f;
  for (int i = 0; i < 200; ++i) sum += row[(i * 7 + n) % 200];
  out[threadIdx.x] = sum;
}
extern "C" __global__ void plain(float* out) { out[threadIdx.x] *= 2.0f; }
"""


def test_cubin_reader_finds_the_cubin_in_a_library_and_agrees_with_ptxas():
    """A dynamically indexed row array goes to local memory: ptxas reports the frame, and the
    cubin reader, looking past a host ELF as in an exported .so, reads the same registers and frame."""
    if not shutil.which("nvcc"):
        pytest.skip("needs nvcc")
    from lntune.inspect import compile_cubin, cubin_resources, embedded_cubins, embedded_cuda_resources, ptxas_report

    cubin, report = compile_cubin(SPILLING_KERNEL, "sm_90")
    want = {name: {"registers": f["registers"], "stack": f["stack"]} for name, f in ptxas_report(report).items()}
    assert want["spills"]["stack"] >= 800 and want["plain"]["stack"] == 0
    assert cubin_resources(cubin) == want
    host_elf = Path(sys.executable).resolve().read_bytes()[:4096]
    library = host_elf + b"\0" * 13 + cubin + b"tail"
    assert embedded_cubins(library) == [cubin]
    assert embedded_cuda_resources(library) == want
    assert embedded_cuda_resources(host_elf) == {}


def test_stack_check_falls_back_to_ptxas_when_the_embedded_cubin_is_unreadable(monkeypatch):
    """A cubin whose .nv.info this reader cannot parse, or that lacks a kernel's frame, must not pass
    the stack check by default: the facts then come from ptxas on the module's source."""
    from lntune import inspect

    monkeypatch.setattr(inspect, "built_cuda_resources", lambda lib, arch: {"k": {"registers": 9, "stack": 4096}})
    monkeypatch.setattr(inspect, "embedded_cuda_resources", lambda blob: {"k": {"registers": 9}})
    assert inspect.stack_frame_bytes(None, "sm_90", b"library") == 4096

    def unreadable(blob):
        raise ValueError("cubin .nv.info: unexpected record format 7 at 12")

    monkeypatch.setattr(inspect, "embedded_cuda_resources", unreadable)
    assert inspect.stack_frame_bytes(None, "sm_90", b"library") == 4096
    monkeypatch.setattr(inspect, "embedded_cuda_resources", lambda blob: {"k": {"registers": 9, "stack": 16}})
    assert inspect.stack_frame_bytes(None, "sm_90", b"library") == 16


def test_a_cuda_source_module_is_packed_as_a_cubin_and_the_rest_as_it_was():
    """build.cuda_modules_compiled on TVM's own blob of a module built here (CUDA source, no driver):
    the CUDA module's format and code change, its function table and every other byte stay."""
    import tvm_ffi

    from lntune.build import _Reader, cuda_modules_compiled, kernel_library
    from schedules.targets import get_target
    from te_ops.layer_norm import Kernel

    lib = kernel_library(Kernel("forward", 1024, "float32"), get_target("cuda-sm90"))
    blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(lib.mod).numpy())
    seen = []
    packed = cuda_modules_compiled(blob, lambda source: seen.append(source) or b"\x7fELF compiled")
    assert seen == [lib.mod.imports[0].inspect_source()]

    def modules(data):
        view = _Reader(data)
        assert view.u64() == len(data) - 8
        count = len(view.u64s()) - 1
        view.u64s()
        out = []
        for _ in range(count):
            kind = view.string()
            out.append((kind, None if kind == b"_lib" else view.string()))
        assert view.at == len(data)
        return out

    before, after = modules(blob), modules(packed)
    assert [k for k, _ in before] == [k for k, _ in after] == [b"_lib", b"cuda"]
    old, new = before[1][1], after[1][1]
    assert old.startswith(_string(b"cuda")) and new.startswith(_string(b"cubin"))
    assert new.endswith(_string(b"\x7fELF compiled"))
    table = old[len(_string(b"cuda")) : len(old) - len(_string(seen[0].encode()))]
    assert new == _string(b"cubin") + table + _string(b"\x7fELF compiled")
    assert cuda_modules_compiled(packed, lambda source: pytest.fail("compiled twice")) == packed
    with pytest.raises(ValueError, match="library blob"):
        cuda_modules_compiled(blob[:-3], lambda source: b"")


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data
