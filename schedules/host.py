"""The host an llvm export is made for and runs on: its CPU, its cores, and TVM's thread pool.

No TVM import at module level: `configure_thread_pool` is for a process that has only the TVM
runtime (the runner's case).
"""

from __future__ import annotations

import os

_CONFIGURED = False  # configure_thread_pool has run in this process


def host_threads() -> int:
    """The cores this process may run on (its affinity mask: what a container or taskset grants)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_thread_pool(threads: int | None = None) -> int:
    """Size this thread's TVM pool to `threads` (default: host_threads()), the workers sharing the
    cores of the affinity mask, unless TVM_NUM_THREADS says otherwise. Returns the thread count.

    TVM's own default is half of std::thread::hardware_concurrency() on x86 (it assumes hyper-
    threading), which on a 2-vCPU VM is one thread, and it counts the machine's CPUs, not the ones
    a container grants. Needs only the TVM runtime."""
    import tvm

    global _CONFIGURED
    _CONFIGURED = True
    explicit = os.environ.get("TVM_NUM_THREADS", "").strip()
    if explicit:
        # Not runtime.NumThreads(): that creates the pool, and a pool of one worker binds the
        # calling thread to core 0 (TVM 0.27's default affinity mode), torch's threads included.
        return max(1, int(explicit)) if explicit.isdigit() else 1
    threads = threads or host_threads()
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cpus = list(range(threads))
    # -3: kSpecifyThreadShareAllCore, every worker may run on every granted core (no pinning). TVM
    # sizes the pool by the list's length, so the ids repeat when more threads than cores are asked.
    ids = [str(cpus[i % len(cpus)]) for i in range(threads)]
    tvm.get_global_func("runtime.config_threadpool")(-3, threads, ids)
    return tvm.get_global_func("runtime.NumThreads")()


def ensure_thread_pool() -> None:
    """configure_thread_pool() once a process, unless the process configured the pool itself."""
    if not _CONFIGURED:
        configure_thread_pool()


def host_spec(base: dict) -> dict:
    """The llvm target of this host: `base` with its CPU (LLVM's name for it, so the code uses its
    vector units) and its core count (what MetaSchedule's CPU rules size parallel work by)."""
    from tvm.target import codegen

    return {**base, "mcpu": codegen.llvm_get_system_cpu(), "num-cores": host_threads()}


__all__ = ["configure_thread_pool", "ensure_thread_pool", "host_spec", "host_threads"]
