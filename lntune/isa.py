"""ROCm code objects inside an exported library: find them, read their kernel metadata, disassemble.

Checks what the design spaces intend on AMD GPUs without one: 16-byte global loads
(`global_load_dwordx4`), no scratch (private segment 0, no spills), and VGPR/SGPR/LDS use that
leaves room for several waves per SIMD.
"""

from __future__ import annotations

import re
import struct
import subprocess
import tempfile
from pathlib import Path

EM_AMDGPU = 224
VGPRS_PER_SIMD_LANE = 512  # CDNA2/3 wave64 register file per lane (MI200, MI300)
MAX_WAVES_PER_SIMD = 8
LLVM_BIN_DIRS = [Path(f"/usr/lib/llvm-{v}/bin") for v in (22, 21, 20, 19, 18, 17)] + [Path("/opt/rocm/llvm/bin")]


def llvm_tool(name: str) -> str | None:
    """An LLVM tool new enough for gfx942 (17+), or None."""
    for directory in LLVM_BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    return None


def code_objects(blob: bytes) -> list[bytes]:
    """The AMDGPU ELF code objects (hsaco) embedded in a host library."""
    images = []
    for match in re.finditer(rb"\x7fELF\x02\x01", blob):
        start = match.start()
        if start == 0 or struct.unpack_from("<H", blob, start + 0x12)[0] != EM_AMDGPU:
            continue
        shoff = struct.unpack_from("<Q", blob, start + 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", blob, start + 0x3A)
        images.append(blob[start : start + shoff + shentsize * shnum])
    return images


_FIELDS = {
    "vgpr": r"\.vgpr_count:\s+(\d+)",
    "sgpr": r"\.sgpr_count:\s+(\d+)",
    "lds": r"\.group_segment_fixed_size:\s+(\d+)",
    "private": r"\.private_segment_fixed_size:\s+(\d+)",
    "vgpr_spills": r"\.vgpr_spill_count:\s+(\d+)",
    "sgpr_spills": r"\.sgpr_spill_count:\s+(\d+)",
    "threads": r"\.max_flat_workgroup_size:\s+(\d+)",
}
SIMDS_PER_CU = 4


def kernel_facts(code_object: bytes, mcpu: str) -> dict[str, dict[str, int]]:
    """kernel name -> registers, LDS, scratch, spills, 16-byte loads and waves per SIMD."""
    readelf, objdump = llvm_tool("llvm-readelf"), llvm_tool("llvm-objdump")
    if not readelf or not objdump:
        raise RuntimeError("ROCm inspection needs llvm-readelf/llvm-objdump 17+ (Debian: apt-get install llvm-19)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.hsaco"
        path.write_bytes(code_object)
        notes = subprocess.run([readelf, "--notes", str(path)], capture_output=True, text=True, check=True).stdout
        asm = subprocess.run(
            [objdump, "-d", f"--mcpu={mcpu}", str(path)], capture_output=True, text=True, check=True
        ).stdout
    facts: dict[str, dict[str, int]] = {}
    for block in re.split(r"\n\s+- \.agpr_count", notes)[1:]:
        name = re.search(r"\.name:\s+(\w+_kernel)\n", block).group(1).removesuffix("_kernel")
        facts[name] = {key: int(m.group(1)) if (m := re.search(rx, block)) else 0 for key, rx in _FIELDS.items()}
    for name, body in re.findall(r"<(\w+)_kernel>:\n(.*?)(?=\n\n|\Z)", asm, flags=re.S):
        if name in facts:
            facts[name]["dwordx4_loads"] = body.count("global_load_dwordx4")
    for f in facts.values():
        f.setdefault("dwordx4_loads", 0)
        allocated = max(8, -(-f["vgpr"] // 8) * 8)
        f["waves_per_simd"] = min(MAX_WAVES_PER_SIMD, VGPRS_PER_SIMD_LANE // allocated)
        # Workgroups resident per CU as the VGPRs allow (LDS is far from binding for these kernels).
        f["groups_per_cu"] = f["waves_per_simd"] * SIMDS_PER_CU // max(1, -(-f["threads"] // 64))
    return facts


def library_facts(library: Path, mcpu: str) -> dict[str, dict[str, int]]:
    facts: dict[str, dict[str, int]] = {}
    for image in code_objects(library.read_bytes()):
        facts.update(kernel_facts(image, mcpu))
    return facts
