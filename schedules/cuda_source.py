"""Rewrites of the CUDA source TVM generates, before nvcc compiles it (TVM's
`tvm_callback_cuda_postproc` hook): the cluster launch mark (schedules.cluster), paired 16-bit
conversions (`pack_conversions`) and 16-byte stores kept whole (`whole_vector_stores`). Each is a
text rewrite that leaves a source without its pattern as it is; `add` installs the hook once and
chains any post-processor registered before lntune's."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

POSTPROC = "tvm_callback_cuda_postproc"
_REWRITES: list[Callable[[str], str]] = []

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


def add(rewrite: Callable[[str], str]) -> None:
    """Run `rewrite` on every CUDA source TVM generates from now on (after those added before)."""
    if rewrite not in _REWRITES:
        _REWRITES.append(rewrite)
    _install()


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


def _install() -> None:
    import tvm_ffi

    if getattr(_install, "done", False):
        return
    previous = tvm_ffi.get_global_func(POSTPROC, allow_missing=True)

    def lntune_cuda_postproc(code, target):
        code = previous(code, target) if previous is not None else code
        for rewrite in _REWRITES:
            code = rewrite(code)
        return code

    tvm_ffi.register_global_func(POSTPROC, lntune_cuda_postproc, override=True)
    _install.done = True


add(pack_conversions)
add(whole_vector_stores)
