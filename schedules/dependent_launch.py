"""The partials sum launched as a programmatic dependent of the backward (CUDA sm_90+).

Launched the ordinary way, the sum's launch is processed only after the backward's grid has
finished. Launched as a programmatic dependent (CUDA's programmatic-stream-serialization launch
attribute), it may be launched as the backward's blocks exit, before the grid's completion is
signalled; its threads wait for the backward's grid to complete and its writes to be visible
(`griddepcontrol.wait`) before they read a partial. On the H100 that shortened every backward +
sum measured, outputs bitwise equal (docs/performance.md, section 9).

A primary may also allow the launch earlier (`griddepcontrol.launch_dependents`, role "primary"):
from the start of the backward's blocks it made the pair slower (not understood; perhaps the
sum's waiting blocks then sit on SMs the backward still runs on), so lntune does not use it; the
role can still be built. Without a dependency (the sum called on its own, or
after any other kernel) the wait returns at once.

Two places carry it: the kernels' bodies (`with_dependency`, in TIR, at the top of the outermost
thread-bound loop) and the sum's launch. TVM's runtime sets the launch attribute for a kernel
whose launch parameters list `tirx.use_programtic_dependent_launch` (sic); lntune's TIR pipeline
(schedules.pipeline) adds it to the device kernels of functions marked `DEPENDENT_KEY`.
"""

from __future__ import annotations

from tvm import tirx
from tvm.backend.cuda.op import cuda_func_call

from schedules import tir_tree

DEPENDENT_KEY = "lntune.dependent_launch"  # function attribute: launch it as a dependent
LAUNCH_TAG = "tirx.use_programtic_dependent_launch"  # TVM runtime's spelling
DYNAMIC_SHARED_TAG = "tirx.use_dyn_shared_memory"  # TVM requires this one last
LAUNCH_PARAMS = "tirx.kernel_launch_params"  # a device kernel's attribute listing them

_HELPERS = """
#ifndef LNTUNE_DEPENDENT_LAUNCH
#define LNTUNE_DEPENDENT_LAUNCH
__device__ __forceinline__ void lntune_allow_dependents() {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    asm volatile("griddepcontrol.launch_dependents;\\n");
  }
}
__device__ __forceinline__ void lntune_wait_for_prerequisites() {
  asm volatile("griddepcontrol.wait;\\n" ::: "memory");
}
#endif
"""
# Thread 0 alone triggers (one trigger a block is all that counts). Issued by every thread at the
# top of the kernel, the asm cost float32 N = 4096's interleaved row caches their registers
# (ptxas put them in a 49 KB stack frame), as st.async did in schedules/cluster.py.
ROLES = {"primary": "lntune_allow_dependents", "dependent": "lntune_wait_for_prerequisites"}


def _is_thread_bound(stmt: tirx.Stmt) -> bool:
    return isinstance(stmt, tirx.For) and stmt.thread_binding is not None


def with_dependency(func: tirx.PrimFunc, role: str) -> tirx.PrimFunc:
    """`func` with its role's instruction first in the kernel: the primary allows its dependent's
    launch, the dependent waits for its prerequisites (and is marked to be launched as one)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    call = tirx.Evaluate(cuda_func_call(ROLES[role], source_code=_HELPERS))

    def first_thread_loop(stmt):
        if _is_thread_bound(stmt):
            return tir_tree.loop_with(stmt, tirx.SeqStmt([call, stmt.body]))
        return None

    if not tir_tree.find(func.body, _is_thread_bound):
        raise ValueError("a kernel with a launch dependency needs a thread-bound loop")
    func = func.with_body(tir_tree.rewrite(func.body, first_thread_loop))
    return func.with_attr(DEPENDENT_KEY, True) if role == "dependent" else func


def with_launch_tag(tags) -> list[str]:
    """Kernel launch parameters with the dependent-launch flag (before the dynamic shared memory
    tag, which TVM's runtime requires to be last)."""
    tags = [str(t) for t in tags]
    if LAUNCH_TAG in tags:
        return tags
    at = len(tags) - 1 if tags and tags[-1] == DYNAMIC_SHARED_TAG else len(tags)
    return [*tags[:at], LAUNCH_TAG, *tags[at:]]


def with_launch_flag(kernel: tirx.PrimFunc) -> tirx.PrimFunc:
    """A device kernel (lowered, split from its host function) launched as a dependent."""
    return kernel.with_attr(LAUNCH_PARAMS, with_launch_tag(kernel.attrs[LAUNCH_PARAMS]))
