"""What a CUDA backward block needs, estimated from its knobs: registers a thread and dynamic shared
memory. The variant grid (schedules.variants) and the knobs of untuned sizes (schedules.untuned)
check candidates against them."""

from __future__ import annotations

from schedules.backward import GAMMA_SHARED
from schedules.layout import block_kernel
from te_ops.layer_norm import Kernel

REGISTERS_PER_SM = 65536  # every CUDA GPU since sm_50


def block_hidden(kernel: Kernel, knobs: dict) -> int:
    """The columns of a row that one thread block handles (half of them in a cluster)."""
    return block_kernel(kernel, knobs.get("cluster") or 0).hidden


def registers_needed(kernel: Kernel, knobs: dict) -> int:
    """A rough count of the 32-bit registers a backward thread keeps live: its cached rows, fp32
    accumulators, gamma slice, 16-bit dx staging and fp32 row stages, plus ~20 for addresses, row
    statistics and the allreduce. Checked against ptxas for every CUDA backward (sm_90,
    2026-11-26): where this fits a register budget, ptxas fitted it without spilling in all but a
    few cases."""
    per_thread = block_hidden(kernel, knobs) // knobs["threads"]
    words = 1.0 if kernel.dtype == "float32" else 0.5
    param_words = 1.0 if kernel.params == "float32" else 0.5  # float32 gamma beside 16-bit rows: mixed
    stage = knobs.get("stage_rows", 0)
    # Staged, the row being reduced lives in its fp32 stages; its cached x and dy are dead by then.
    cached_rows = knobs["rows_per_step"] - (1 if stage else 0) if knobs["cache_rows"] else 0
    rows = cached_rows * 2 * per_thread * words
    accumulators = 0 if knobs["shared_acc"] else 2 * per_thread
    # gamma: this thread's slice, in its own dtype or (stage 2) widened to fp32; none when shared.
    gamma = (per_thread if stage == 2 else per_thread * param_words) if knobs["cache_gamma"] == 1 else 0
    staging = per_thread * words if words < 1 else 0
    stages = {0: 0, 1: 3 * per_thread, 2: 2 * per_thread}[stage]  # xhat, dy (and dy*gamma) in fp32
    return int(rows + accumulators + gamma + staging + stages) + 20


def shared_bytes_needed(kernel: Kernel, knobs: dict) -> int:
    """Dynamic shared memory of a CUDA backward block: prefetched rows of x and dy (depth + 1 steps
    in flight), shared dgamma/dbeta accumulators and gamma in fp32 (cache_gamma 2)."""
    columns = block_hidden(kernel, knobs)
    row = columns * (4 if kernel.dtype == "float32" else 2)
    depth = knobs.get("prefetch", 0)
    rows = (depth + 1) * knobs["rows_per_step"] * 2 * row if depth else 0
    gamma = columns * 4 if knobs["cache_gamma"] == GAMMA_SHARED else 0
    return rows + (2 * columns * 4 if knobs["shared_acc"] else 0) + gamma
