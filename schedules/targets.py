"""The target registry: complete TVM target dicts plus the facts that schedules and export need."""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from schedules import host


@dataclass(frozen=True)
class TargetInfo:
    """One registered target: its TVM dict and the hardware facts the design spaces are written against."""

    name: str
    spec: dict
    family: str  # "cpu", "cuda" or "rocm"
    warp: int = 1
    max_threads: int = 1
    shared_bytes: int = 0
    dynamic_shared_bytes: int = 0  # what one block may opt into (CUDA dynamic shared memory)
    cores: int = 1  # SMs or CUs; sets the number of row chunks (partials) in the backward
    notes: str = ""

    @property
    def is_gpu(self) -> bool:
        return self.family != "cpu"

    @property
    def has_clusters(self) -> bool:
        """Thread-block clusters with distributed shared memory: NVIDIA sm_90 and later."""
        return self.family == "cuda" and int(self.spec["arch"].removeprefix("sm_").rstrip("a")) >= 90

    @property
    def has_dependent_launch(self) -> bool:
        """Programmatic dependent launch (griddepcontrol): NVIDIA sm_90 and later, as clusters."""
        return self.has_clusters

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(self.spec)

    def device(self, index: int = 0):
        return {"cpu": tvm.cpu, "cuda": tvm.cuda, "rocm": tvm.rocm}[self.family](index)


def _host_cpu() -> TargetInfo:
    """This host's CPU: LLVM's name for it (so the code uses its vector units: without one, LLVM
    targets baseline x86-64, SSE2) and the cores this process may use. An export is made for the
    host that exports it (the manifest records the spec); the thread count is not compiled in, the
    runtime pool of the process that loads the library decides it (schedules.host)."""
    spec = host.host_spec({"kind": "llvm"})
    return TargetInfo("llvm", spec, "cpu", cores=spec["num-cores"], notes=f"host CPU ({spec['mcpu']}, LLVM)")


def _cuda(name: str, arch: str, sms: int, shared: int, dynamic: int, notes: str) -> TargetInfo:
    spec = {
        "kind": "cuda",
        "arch": arch,
        "max_threads_per_block": 1024,
        "max_shared_memory_per_block": shared,
        "thread_warp_size": 32,
        "max_num_threads": 1024,
    }
    limits = dict(warp=32, max_threads=1024, shared_bytes=shared, dynamic_shared_bytes=dynamic)
    return TargetInfo(name, spec, "cuda", cores=sms, notes=notes, **limits)


def _rocm(name: str, mcpu: str, cus: int, notes: str) -> TargetInfo:
    spec = {
        "kind": "rocm",
        "mcpu": mcpu,
        "mtriple": "amdgcn-amd-amdhsa-hcc",
        "max_threads_per_block": 1024,
        "max_shared_memory_per_block": 65536,
        "thread_warp_size": 64,
        "max_num_threads": 1024,
    }
    return TargetInfo(name, spec, "rocm", warp=64, max_threads=1024, shared_bytes=65536, cores=cus, notes=notes)


TARGETS: dict[str, TargetInfo] = {
    t.name: t
    for t in (
        _host_cpu(),
        # Opt-in dynamic shared memory per block: 163 KB (A100), 227 KB (H100), CUDA guide table 21.
        _cuda("cuda-sm80", "sm_80", 108, 49152, 163 * 1024, "NVIDIA A100 (108 SMs)"),
        _cuda("cuda-sm90", "sm_90", 132, 49152, 227 * 1024, "NVIDIA H100 SXM (132 SMs)"),
        _rocm("rocm-gfx90a", "gfx90a", 104, "AMD MI200 series (104 CUs on MI210)"),
        _rocm("rocm-gfx942", "gfx942", 304, "AMD MI300X (304 CUs)"),
    )
}


def get_target(name: str) -> TargetInfo:
    """The registered target called `name`, or a ValueError listing the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {name!r}") from None
