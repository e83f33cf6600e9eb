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
    """Whether a CUDA driver is loadable here (export then embeds a cubin instead of CUDA source)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True
