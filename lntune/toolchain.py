"""Finds the programs a target's export needs, so users need not export variables themselves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LLD_DIRS = [Path(f"/usr/lib/llvm-{v}/bin") for v in (22, 21, 20, 19, 18)]
ROCM_BITCODE_ROOTS = [Path("/opt/rocm"), Path("/usr/lib/x86_64-linux-gnu")]


def prepare_rocm() -> None:
    """Put ld.lld on PATH and point ROCM_PATH at the device bitcode, or say what to install."""
    if shutil.which("ld.lld") is None:
        found = next((d for d in LLD_DIRS if (d / "ld.lld").exists()), None)
        if found is None:
            raise RuntimeError("ROCm export needs ld.lld: install it (Debian: apt-get install lld-19)")
        os.environ["PATH"] = f"{found}{os.pathsep}{os.environ.get('PATH', '')}"
    if "ROCM_PATH" not in os.environ or not (Path(os.environ["ROCM_PATH"]) / "amdgcn/bitcode").is_dir():
        root = next((r for r in ROCM_BITCODE_ROOTS if (r / "amdgcn/bitcode/ocml.bc").exists()), None)
        if root is None:
            raise RuntimeError(
                "ROCm export needs the ROCm device bitcode (ocml.bc, ockl.bc): install it "
                "(Debian: apt-get install rocm-device-libs) or set ROCM_PATH to a ROCm install"
            )
        os.environ["ROCM_PATH"] = str(root)


def cuda_driver_present() -> bool:
    """Whether a CUDA driver is loadable here (TVM then compiles CUDA modules as it builds them;
    without one lntune.build compiles them when it exports the library: a cubin either way)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cuda_arch(target) -> str | None:
    """The architecture CUDA code for `target` is compiled for (a TVM Target, a target dict or a
    schedules.targets.TargetInfo; None without an arch). TVM's own rule for a device it detects:
    sm_90 and later get their architecture-specific features (`sm_90` -> `sm_90a`, as a cuda-sm90
    library built on an H100 always had), earlier ones are as given."""
    spec = getattr(target, "spec", target)
    arch = spec.get("arch") if isinstance(spec, dict) else (spec.attrs.get("arch") if spec is not None else None)
    if not arch:
        return None
    arch = str(arch)
    digits = arch.removeprefix("sm_")
    return f"{arch}a" if digits.isdigit() and int(digits) >= 90 else arch


def cuda_compiler() -> str:
    """ "nvrtc" or "nvcc": TVM's choice when it compiles with a driver present (TVM_CUDA_COMPILE_MODE,
    NVRTC by default), NVRTC only where its Python bindings (cuda-bindings) are installed."""
    import importlib.util

    mode = os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc").lower()
    if mode == "nvrtc" and importlib.util.find_spec("cuda") and importlib.util.find_spec("cuda.bindings"):
        return "nvrtc"
    if shutil.which("nvcc") is None and mode != "nvcc":
        raise RuntimeError(
            "CUDA export needs a CUDA compiler: nvcc on PATH (the CUDA toolkit) or NVRTC's Python bindings "
            "(pip install cuda-bindings)"
        )
    return "nvcc"


def cuda_binary(source: str, arch: str) -> bytes:
    """A cubin of CUDA source for `arch` (sm_90a, ...), compiled as TVM compiles CUDA modules
    (tvm.support.nvcc.compile_cuda: its flags, --use_fast_math among them), with `cuda_compiler()`."""
    import tvm
    from tvm.support import nvcc

    # nvcc's path reads the architecture from the current target too.
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return bytes(nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler=cuda_compiler()))
