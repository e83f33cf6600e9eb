"""`lntune inspect`: what an exported library holds, per kernel.

Always: op, hidden, dtype, P, where its schedule came from, and its knobs (from manifest.json).
For a CUDA library: its machine code (a cubin and its architecture, `machine_code`), and registers
and stack frame per kernel (a stack frame means a register-cached row went to local memory), read
from that cubin; for a library of an older lntune holding CUDA source instead, from ptxas when nvcc
is on PATH (which also gives the spills).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from lntune import files
from lntune.files import LIBRARY

_PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_cubin(source: bytes, arch: str) -> tuple[bytes, str]:
    """nvcc's cubin of CUDA source for `arch`, and ptxas's -v report."""
    with tempfile.TemporaryDirectory() as tmp:
        cu, cubin = Path(tmp) / "kernels.cu", Path(tmp) / "k.cubin"
        cu.write_bytes(source)
        command = ["nvcc", f"-arch={arch}", "-cubin", "-o", str(cubin), str(cu), "-diag-suppress", "1444"]
        out = subprocess.run([*command, "-Xptxas", "-v"], capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"nvcc failed on the library's CUDA source:\n{out.stderr[-2000:]}")
        return cubin.read_bytes(), out.stderr


def cuda_resources(source: bytes, arch: str) -> dict[str, dict[str, int]]:
    """kernel name -> registers, stack and spill bytes, as ptxas reports them for `arch`."""
    return ptxas_report(compile_cubin(source, arch)[1])


def ptxas_report(report: str) -> dict[str, dict[str, int]]:
    """kernel name -> registers, stack and spill bytes, from ptxas -v's output."""
    facts: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        if m := _PTXAS_FUNCTION.search(line):
            current = m.group(1).removesuffix("_kernel")
            facts[current] = {}
        elif current and (m := _PTXAS_FRAME.search(line)):
            facts[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := _PTXAS_USAGE.search(line)):
            facts[current]["registers"] = int(m.group(1))
    return facts


_NOT_SOURCE = re.compile(rb"[^\t\n\r\x20-\x7e]")


def built_cuda_source(lib) -> bytes | None:
    """The CUDA source of a freshly built CUDA module (tvm.compile's result), None without one."""
    return _cuda_source(lib.mod.imports[0].inspect_source().encode())


def built_cuda_resources(lib, arch: str) -> dict[str, dict[str, int]] | None:
    """cuda_resources of a freshly built CUDA module (tvm.compile's result); None without nvcc or
    without source to compile."""
    source = built_cuda_source(lib)
    if source is None or not shutil.which("nvcc"):
        return None
    return cuda_resources(source, arch)


def stack_frame_bytes(lib, arch: str, exported: bytes = b"") -> int | None:
    """The largest per-thread stack frame among a freshly built CUDA module's kernels: from the cubin
    its exported library (`exported`, the .so's bytes) embeds when there is one, so nothing is compiled
    twice; else from ptxas for `arch` on its source; None without either."""
    resources = _readable_embedded_resources(exported) or built_cuda_resources(lib, arch)
    if resources is None:
        return None
    return max((facts.get("stack", 0) for facts in resources.values()), default=0)


# ELF facts of a cubin: machine EM_CUDA; the `.nv.info` section holds records (format byte, attribute
# byte, then a value), and for each kernel EIATTR_REGCOUNT and EIATTR_FRAME_SIZE carry (symbol index,
# value) pairs, the figures ptxas -v prints as "Used N registers" and "N bytes stack frame".
_EM_CUDA = 190
_EIFMT_SVAL, _EIFMT_HVAL = 4, 3
_EIATTR = {0x2F: "registers", 0x11: "stack"}


def embedded_cubins(blob: bytes) -> list[bytes]:
    """Every CUDA ELF (cubin) inside `blob` (a shared library or a cubin), whole."""
    found, start = [], blob.find(b"\x7fELF")
    while start >= 0:
        if len(blob) >= start + 64 and struct.unpack_from("<H", blob, start + 18)[0] == _EM_CUDA:
            end = start + _elf_size(blob, start)
            if end <= len(blob):
                found.append(blob[start:end])
        start = blob.find(b"\x7fELF", start + 4)
    return found


_FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")


def machine_code(blob: bytes) -> str | None:
    """ "cubin" when `blob` (a library) holds a CUDA ELF, "fatbin" when a fat binary, else None."""
    if embedded_cubins(blob):
        return "cubin"
    return "fatbin" if _FATBIN_MAGIC in blob else None


def cubin_arch(cubin: bytes) -> str:
    """The SM architecture a cubin was compiled for ("sm_90": an sm_90a cubin reads the same), from its
    ELF flags (the SM number in bits 8-15 from ELF ABI version 8, CUDA 12.8+; bits 0-7 before)."""
    (flags,) = struct.unpack_from("<I", cubin, 0x30)
    return f"sm_{(flags >> 8) & 0xFF if cubin[8] >= 8 else flags & 0xFF}"


def _elf_size(blob: bytes, start: int) -> int:
    """Bytes of the ELF64 at `start`: to the end of its header tables or its last section's data."""
    phoff, shoff = struct.unpack_from("<QQ", blob, start + 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", blob, start + 0x36)
    size = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    if start + size > len(blob):
        return size
    for i in range(shnum):
        kind, _flags, _addr, offset, length = struct.unpack_from("<IQQQQ", blob, start + shoff + i * shentsize + 4)
        if kind != 8:  # SHT_NOBITS occupies no bytes in the file
            size = max(size, offset + length)
    return size


def cubin_resources(cubin: bytes) -> dict[str, dict[str, int]]:
    """kernel name -> registers and stack frame bytes, read from a cubin's `.nv.info`."""
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def name(table_offset: int, offset: int) -> str:
        return cubin[table_offset + offset : cubin.index(b"\0", table_offset + offset)].decode()

    by_name = {name(names_at, s[0]): s for s in sections}
    symtab = by_name[".symtab"]
    strings_at = sections[symtab[6]][4]
    symbols = [name(strings_at, struct.unpack_from("<I", cubin, symtab[4] + i * 24)[0]) for i in range(symtab[5] // 24)]
    info = by_name[".nv.info"]
    data, at, facts = cubin[info[4] : info[4] + info[5]], 0, {}
    while at + 4 <= len(data):
        form, attribute = data[at], data[at + 1]
        if form == _EIFMT_SVAL:
            (size,) = struct.unpack_from("<H", data, at + 2)
            if attribute in _EIATTR and size == 8:
                symbol, value = struct.unpack_from("<II", data, at + 4)
                facts.setdefault(symbols[symbol].removesuffix("_kernel"), {})[_EIATTR[attribute]] = value
            at += 4 + size
        elif form == _EIFMT_HVAL:
            at += 4
        else:
            raise ValueError(f"cubin .nv.info: unexpected record format {form} at {at}")
    return facts


def _readable_embedded_resources(blob: bytes) -> dict[str, dict[str, int]]:
    """embedded_cuda_resources if it gives every kernel's registers and frame, else {}: a cubin this
    reader does not understand sends the caller back to ptxas rather than past its stack check."""
    try:
        facts = embedded_cuda_resources(blob)
    except (ValueError, KeyError, IndexError, struct.error):
        return {}
    return facts if all({"registers", "stack"} <= set(f) for f in facts.values()) else {}


def embedded_cuda_resources(blob: bytes) -> dict[str, dict[str, int]]:
    """cubin_resources of every cubin inside `blob` together ({} when it holds none)."""
    facts: dict[str, dict[str, int]] = {}
    for cubin in embedded_cubins(blob):
        facts.update(cubin_resources(cubin))
    return facts


def _cuda_source(blob: bytes) -> bytes | None:
    """The CUDA source a CPU-only export embeds: plain ASCII from its header to the first other byte."""
    start = blob.find(b"#ifdef __CUDACC_RTC__")
    if start < 0:
        return None
    end = _NOT_SOURCE.search(blob, start)
    return blob[start : end.start() if end else None]


def inspect_library(path: Path) -> str:
    """The table `lntune inspect` prints. The export is checked first (files.read_manifest): a
    missing or damaged one raises files.LibraryError, one line naming the file."""
    directory = files.library_directory(path)
    manifest = files.read_manifest(directory)
    resources: dict[str, dict[str, int]] = {}
    note = ""
    if manifest["device"] == "rocm":
        return _rocm_table(directory, manifest)
    if manifest["device"] == "cuda":
        blob = (directory / LIBRARY).read_bytes()
        source = _cuda_source(blob)
        if source is None:
            resources = _readable_embedded_resources(blob)
            cubins = embedded_cubins(blob)
            if not cubins:
                found = machine_code(blob)
                note = f"({found}: registers not shown)" if found else "(no machine code found in the library)"
            else:
                arches = ", ".join(sorted({cubin_arch(c) for c in cubins}))
                note = f"for {arches} " + (
                    "(registers and stack from the embedded cubin; spills not shown)" if resources else "(cubin unread)"
                )
        elif shutil.which("nvcc"):
            resources = cuda_resources(source, manifest.get("target_spec", {}).get("arch", "sm_90"))
        else:
            note = "(nvcc not found: registers not shown)"
    lines = [
        f"{manifest['target']} library, device code: {manifest.get('device_code', '?')} {note}".rstrip(),
        f"{'kernel':<42} {'regs':>4} {'stack':>5} {'spill':>5}  schedule / knobs",
    ]
    for v in manifest["variants"]:
        r = resources.get(v["function"], {})
        regs, stack = r.get("registers", "-"), r.get("stack", "-")
        spill = r["spill_stores"] + r["spill_loads"] if "spill_stores" in r else "-"
        source = v.get("schedule", "?").split(":")[0]
        lines.append(f"{v['function']:<42} {regs:>4} {stack:>5} {spill:>5}  {source} {v.get('knobs', {})}")
    return "\n".join(lines)


def _rocm_table(directory: Path, manifest: dict) -> str:
    from lntune import isa

    facts = isa.library_facts(directory / LIBRARY, manifest["target_spec"]["mcpu"])
    lines = [
        f"{manifest['target']} library, device code: {manifest.get('device_code', '?')}",
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
            f"  {v.get('schedule', '?').split(':')[0]}"
        )
    return "\n".join(lines)
