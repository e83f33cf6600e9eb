"""`lntune inspect`: what an exported library holds, per kernel.

Always: op, hidden, dtype, P, where its schedule came from, and its knobs (from manifest.json).
For a CUDA library holding source, when nvcc is on PATH: ptxas's registers, stack frame and spills per
kernel (a stack frame means a register-cached row went to local memory).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from lntune.runner import LIBRARY, MANIFEST

_PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def cuda_resources(source: bytes, arch: str) -> dict[str, dict[str, int]]:
    """kernel name -> registers, stack and spill bytes, as ptxas reports them for `arch`."""
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "kernels.cu"
        cu.write_bytes(source)
        out = subprocess.run(
            [
                "nvcc",
                f"-arch={arch}",
                "-cubin",
                "-o",
                str(Path(tmp) / "k.cubin"),
                str(cu),
                "-diag-suppress",
                "1444",
                "-Xptxas",
                "-v",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if out.returncode:
        raise RuntimeError(f"nvcc failed on the library's CUDA source:\n{out.stderr[-2000:]}")
    facts: dict[str, dict[str, int]] = {}
    current = None
    for line in out.stderr.splitlines():
        if m := _PTXAS_FUNCTION.search(line):
            current = m.group(1).removesuffix("_kernel")
            facts[current] = {}
        elif current and (m := _PTXAS_FRAME.search(line)):
            facts[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := _PTXAS_USAGE.search(line)):
            facts[current]["registers"] = int(m.group(1))
    return facts


_NOT_SOURCE = re.compile(rb"[^\t\n\r\x20-\x7e]")


def built_cuda_resources(lib, arch: str) -> dict[str, dict[str, int]] | None:
    """cuda_resources of a freshly built CUDA module (tvm.compile's result); None without nvcc or
    without source to compile."""
    source = _cuda_source(lib.mod.imports[0].inspect_source().encode())
    if source is None or not shutil.which("nvcc"):
        return None
    return cuda_resources(source, arch)


def stack_frame_bytes(lib, arch: str) -> int | None:
    """The largest per-thread stack frame among a freshly built CUDA module's kernels (ptxas, for
    `arch`); None without nvcc or without source to compile."""
    resources = built_cuda_resources(lib, arch)
    if resources is None:
        return None
    return max((facts.get("stack", 0) for facts in resources.values()), default=0)


def _cuda_source(blob: bytes) -> bytes | None:
    """The CUDA source a CPU-only export embeds: plain ASCII from its header to the first other byte."""
    start = blob.find(b"#ifdef __CUDACC_RTC__")
    if start < 0:
        return None
    end = _NOT_SOURCE.search(blob, start)
    return blob[start : end.start() if end else None]


def inspect_library(path: Path) -> str:
    directory = path.parent if path.suffix == ".so" else path
    manifest = json.loads((directory / MANIFEST).read_text())
    resources: dict[str, dict[str, int]] = {}
    note = ""
    if manifest["device"] == "rocm":
        return _rocm_table(directory, manifest)
    if manifest["device"] == "cuda":
        source = _cuda_source((directory / LIBRARY).read_bytes())
        if source is None:
            note = "(cubin inside: registers not shown; run cuobjdump --dump-resource-usage on the GPU host)"
        elif shutil.which("nvcc"):
            resources = cuda_resources(source, manifest["target_spec"].get("arch", "sm_90"))
        else:
            note = "(nvcc not found: registers not shown)"
    lines = [
        f"{manifest['target']} library, device code: {manifest['device_code']} {note}".rstrip(),
        f"{'kernel':<42} {'regs':>4} {'stack':>5} {'spill':>5}  schedule / knobs",
    ]
    for v in manifest["variants"]:
        r = resources.get(v["function"], {})
        regs, stack = r.get("registers", "-"), r.get("stack", "-")
        spill = r.get("spill_stores", 0) + r.get("spill_loads", 0) if r else "-"
        source = v["schedule"].split(":")[0]
        lines.append(f"{v['function']:<42} {regs:>4} {stack:>5} {spill:>5}  {source} {v['knobs']}")
    return "\n".join(lines)


def _rocm_table(directory: Path, manifest: dict) -> str:
    from lntune import isa

    facts = isa.library_facts(directory / LIBRARY, manifest["target_spec"]["mcpu"])
    lines = [
        f"{manifest['target']} library, device code: {manifest['device_code']}",
        f"{'kernel':<42} {'vgpr':>4} {'sgpr':>4} {'lds':>6} {'scratch':>7} {'spills':>6} {'x4 loads':>8} "
        f"{'waves/SIMD':>10} {'groups/CU':>9}  schedule",
    ]
    for v in manifest["variants"]:
        f = facts.get(v["function"], {})
        spills = f.get("vgpr_spills", 0) + f.get("sgpr_spills", 0)
        lines.append(
            f"{v['function']:<42} {f.get('vgpr', '-'):>4} {f.get('sgpr', '-'):>4} {f.get('lds', '-'):>6} "
            f"{f.get('private', '-'):>7} {spills:>6} {f.get('dwordx4_loads', '-'):>8} "
            f"{f.get('waves_per_simd', '-'):>10} {f.get('groups_per_cu', '-'):>9}"
            f"  {v['schedule'].split(':')[0]}"
        )
    return "\n".join(lines)
