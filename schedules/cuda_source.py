"""Rewrites of the CUDA source TVM generates, before nvcc compiles it: the cluster launch mark
(schedules.cluster), paired 16-bit conversions (`pack_conversions`) and 16-byte stores kept whole
(`whole_vector_stores`). TVM calls them through its `tvm_callback_cuda_postproc` hook, which
schedules.hooks installs only around lntune's own builds (`rewrite_source` is what it runs).

Each rewrite is a text rewrite registered with `add` together with the test that says, from a device
kernel's lowered TIR, whether the kernel asks for it (uses the feature it rewrites). A kernel that asks
for a rewrite the source does not let it make is an error naming both (`RewriteMissing`): after a TVM
upgrade that changed what it prints, a silent no-op would be a slower kernel or a wrong launch. A
kernel that does not ask is left to the rewrite, which leaves a source without its pattern as it is."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

POSTPROC = "tvm_callback_cuda_postproc"
_REWRITES: list[Callable[[str], str]] = []
# rewrite name -> test of a device kernel's lowered TIR (its TVMScript): does the kernel ask for it?
_WANTED_BY: dict[str, Callable[[str], bool]] = {}


class RewriteMissing(RuntimeError):
    """A kernel asks for a CUDA source rewrite whose pattern is not in the source TVM generated."""


# TVM writes a float4 -> 4 x 16-bit conversion as four element casts into its half4_bfloat164
# struct (8-byte aligned: x/y and z/w are 4-byte aligned pairs).
_FOUR_CASTS = re.compile(
    r"(?P<indent>\n[ \t]+)(?P<dst>\w+)\.x = \((?P<type>nv_bfloat16|half)\)\((?P<src>\w+)\.x\);"
    r"\s+(?P=dst)\.y = \((?P=type)\)\((?P=src)\.y\);"
    r"\s+(?P=dst)\.z = \((?P=type)\)\((?P=src)\.z\);"
    r"\s+(?P=dst)\.w = \((?P=type)\)\((?P=src)\.w\);"
)
# The round-to-nearest pair conversions: bit for bit what the element casts give.
_PAIR = {"nv_bfloat16": ("nv_bfloat162", "__floats2bfloat162_rn"), "half": ("half2", "__floats2half2_rn")}


def pack_conversions(code: str) -> str:
    """Convert float4 -> 4 x 16-bit in two round-to-nearest pairs instead of four casts.

    From four separate 16-bit values NVVM stored a row of dx as four 4-byte stores in cluster
    kernels (`st.global.v2.u16`, docs/performance.md, section 8); from pairs it keeps one 16-byte store."""

    def pairs(m: re.Match) -> str:
        pair, convert = _PAIR[m["type"]]
        indent, dst, src = m["indent"], m["dst"], m["src"]
        return (
            f"{indent}*({pair}*)&{dst}.x = {convert}({src}.x, {src}.y);"
            f"{indent}*({pair}*)&{dst}.z = {convert}({src}.z, {src}.w);"
        )

    return _FOUR_CASTS.sub(pairs, code)


# A kernel's global buffers are its pointer parameters: `float* __restrict__ dx_ptr`.
_SIGNATURE = re.compile(r"__global__ void[^\n]*?\w\((?P<params>[^()]*)\)\s*[{;]")
_POINTER_PARAM = re.compile(r"\*\s*(?:__restrict__\s+)?(?P<name>\w+)$")
# TVM writes each 16-byte row store as one statement a line: *(uint4*)(dx_ptr + ...) = <value>;
_VECTOR_STORE = re.compile(
    r"^(?P<indent>[ \t]*)\*\((?P<type>uint4|float4)\*\)\((?P<address>(?P<name>\w+) \+ .*?)\) = (?P<value>.*);$"
)


def _global_pointers(code: str) -> set[str]:
    names = set()
    for signature in _SIGNATURE.finditer(code):
        for param in signature["params"].split(","):
            if m := _POINTER_PARAM.search(param.strip()):
                names.add(m["name"])
    return names


def whole_vector_stores(code: str) -> str:
    """Store 16-byte vectors to global memory through `__stwb` (st.global.wb.v4: the default
    caching, one instruction) instead of a plain assignment.

    From the assignment NVVM wrote some 16-bit row stores as four 4-byte `st.global.u32`: the dx
    rows of the cluster kernels (N = 16384) and y in the forward at N = 768 and 1024 (PTX from
    nvcc 13.0), four times the store instructions of a kernel that is issue-bound
    (docs/performance.md, section 8)."""
    pointers = _global_pointers(code)

    def whole(line: str) -> str:
        m = _VECTOR_STORE.match(line)
        if not m or m["name"] not in pointers:
            return line
        return f"{m['indent']}__stwb(({m['type']}*)({m['address']}), {m['value']});"

    return "\n".join(whole(line) for line in code.split("\n"))


def add(rewrite: Callable[[str], str], wanted_by: Callable[[str], bool] | None = None) -> None:
    """Run `rewrite` on every CUDA source lntune builds (after those added before). `wanted_by(tir)`
    says from a device kernel's lowered TIR whether the kernel asks for it; such a kernel must come out
    of the rewrite changed (`rewrite_source`)."""
    if rewrite not in _REWRITES:
        _REWRITES.append(rewrite)
    if wanted_by is not None:
        _WANTED_BY[rewrite.__name__] = wanted_by


def wanted(tir: str) -> set[str]:
    """The rewrites a device kernel asks for, from its lowered TIR (TVMScript text)."""
    return {name for name, asks in _WANTED_BY.items() if asks(tir)}


_KERNEL_START = re.compile(r'extern "C" __global__ void (?:__\w+\([^)]*\) )*(\w+)\(')


def kernel_text(code: str) -> dict[str, str]:
    """Each kernel's text in a CUDA source: its declaration and definition, from `extern "C"
    __global__` to the next kernel's (or the end), joined."""
    starts = [(m.start(), m.group(1)) for m in _KERNEL_START.finditer(code)] + [(len(code), "")]
    texts: dict[str, str] = {}
    for (at, name), (end, _) in zip(starts, starts[1:]):
        texts[name] = texts.get(name, "") + code[at:end]
    return texts


def rewrite_source(code: str, expected: dict[str, set[str]] | None = None) -> str:
    """`code` through every registered rewrite, in order. `expected`: device kernel name -> the
    rewrites it asks for (`wanted`); each must change that kernel's text, or RewriteMissing."""
    expected = expected or {}
    for rewrite in _REWRITES:
        name = rewrite.__name__
        asking = sorted(k for k, names in expected.items() if name in names)
        before = kernel_text(code) if asking else {}
        code = rewrite(code)
        if asking:
            after = kernel_text(code)
            missing = [k for k in asking if k in before and before[k] == after.get(k)]
            absent = [k for k in asking if k not in before]
            if missing or absent:
                raise RewriteMissing(
                    f"lntune: CUDA source rewrite {name} found nothing to rewrite in kernel(s) {missing + absent}, "
                    "which ask for it (their TIR uses what it rewrites); TVM's generated CUDA is not in the form "
                    f"{name} expects (a TVM upgrade?), so the kernel would build without it"
                )
    return code


@contextmanager
def without(name: str) -> Iterator[None]:
    """Build without the rewrite called `name` inside the block (an A/B of one rewrite:
    a kernel timed without it; tests of what TVM emits before it)."""
    rewrite = next((r for r in _REWRITES if r.__name__ == name), None)
    if rewrite is None:
        raise ValueError(f"no CUDA source rewrite named {name!r}; registered: {[r.__name__ for r in _REWRITES]}")
    at = _REWRITES.index(rewrite)
    _REWRITES.remove(rewrite)
    try:
        yield
    finally:
        _REWRITES.insert(at, rewrite)


# A float32x4 -> 4 x 16-bit conversion in the kernel's TIR is what TVM prints as four element casts.
_CONVERTS_FOUR = re.compile(r'T\.Cast\("(?:bfloat16|float16)x4", ')
# A 16-byte store to a kernel's global buffer: `dx[a:a + T.int64(8)] = ...` (bfloat16), the buffer
# declared on a global pointer parameter (`dx_ptr: T.handle("bfloat16", "global")`).
_GLOBAL_PARAM = re.compile(r'(\w+)_ptr: T\.handle\("(\w+)", "global"\)')
_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "int32": 32, "uint32": 32}


def _stores_16_bytes(tir: str) -> bool:
    for name, dtype in _GLOBAL_PARAM.findall(tir):
        bits = _BITS.get(dtype)
        lanes = re.findall(rf"(?m)^\s*{name}\[[^\n]*:[^\n]*\+ T\.int64\((\d+)\)\] = ", tir)
        if bits and any(int(n) * bits == 128 for n in lanes):
            return True
    return False


add(pack_conversions, wanted_by=lambda tir: bool(_CONVERTS_FOUR.search(tir)))
add(whole_vector_stores, wanted_by=_stores_16_bytes)
