"""The tuning driver: one MetaSchedule task per kernel, our design spaces, a resumable JSON database."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from schedules import spaces
from schedules.database import (
    RECORDS,
    TUNING_LOGS,
    WORKLOADS,
    _json_lines,
    choose,
    measured_seconds,
    read_records,
    tune_rows,
    workload,
    workload_hash,
)
from schedules.knobs import Sampled
from schedules.targets import TargetInfo
from te_ops.layer_norm import Kernel

# Each candidate: 3 repeats of >= 50 ms of back-to-back runs (inputs are past the L2 on GPUs).
EVALUATOR = ms.runner.EvaluatorConfig(number=5, repeat=3, min_repeat_ms=50, enable_cpu_cache_flush=False)


def design_space(kernel: Kernel, target: TargetInfo) -> ms.space_generator.ScheduleFn:
    """A ScheduleFn space: our schedule function with sampled knobs, no stock rules."""

    def sample(sch):
        designs = []
        for structure in spaces.structures(kernel, target):
            design = sch.copy()
            design.seed(sch.fork_seed())
            spaces.apply(design, kernel, target, Sampled(structure))
            designs.append(design)
        return designs

    postprocs = [ms.postproc.RewriteParallelVectorizeUnroll()]
    if target.is_gpu:
        postprocs.append(ms.postproc.VerifyGPUCode())
    if spaces.needs_unbound_pair(kernel, target):
        postprocs.append(UnbindPairReduction())
    return ms.space_generator.ScheduleFn(
        sample, sch_rules=[], postprocs=postprocs, mutator_probs={ms.mutator.MutateUnroll(): 1.0}
    )


@derived_object
class UnbindPairReduction(ms.postproc.PyPostproc):
    """spaces.unbind_pair_reduction on each candidate (a CPU bfloat16 backward needs it to build)."""

    def _initialize_with_tune_context(self, context: ms.TuneContext) -> None:
        pass

    def apply(self, sch) -> bool:
        spaces.unbind_pair_reduction(sch)
        return True

    def clone(self) -> UnbindPairReduction:
        return UnbindPairReduction()


def tune_context(kernel: Kernel, target: TargetInfo, seed: int | None = None) -> ms.TuneContext:
    return ms.TuneContext(
        mod=workload(kernel, target),
        target=target.tvm_target(),
        space_generator=design_space(kernel, target),
        search_strategy=ms.search_strategy.EvolutionarySearch(population_size=64, init_measured_ratio=0.2),
        task_name=kernel.name,
        rand_state=seed if seed is not None else -1,
        num_threads=min(os.cpu_count() or 1, 16),
    ).clone()


def tune(
    kernels: list[Kernel],
    target: TargetInfo,
    trials_per_kernel: int,
    log_dir: Path | None = None,
    workers: int | None = None,
    builder_timeout: float = 120.0,
    runner: ms.runner.Runner | str = "local",
    seed: int | None = None,
) -> Path:
    """Tune `kernels`, appending to (and resuming from) the JSON database in `log_dir`."""
    log_dir = Path(log_dir or TUNING_LOGS / target.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(log_dir):
        _tune(kernels, target, trials_per_kernel, log_dir, workers, builder_timeout, runner, seed)
        prune(log_dir)
    return log_dir


@contextlib.contextmanager
def exclusive(log_dir: Path):
    """Hold an exclusive lock on a tuning database; a second tuning run on it is refused at once."""
    handle = (log_dir / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(f"{log_dir} is being tuned by another process; wait for it or use --log-dir") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _tune(kernels, target, trials_per_kernel, log_dir, workers, builder_timeout, runner, seed) -> None:
    database = ms.database.JSONDatabase(work_dir=str(log_dir), module_equality="structural")
    tasks = [tune_context(k, target, seed) for k in kernels]
    per_iter = min(32, trials_per_kernel)
    builder = ms.builder.LocalBuilder(max_workers=workers, timeout_sec=builder_timeout)
    if runner == "local":
        runner = ms.runner.LocalRunner(evaluator_config=EVALUATOR)
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.INFO)
    ms.tune_tasks(
        tasks=tasks,
        task_weights=[1.0] * len(tasks),
        work_dir=str(log_dir / "work"),
        max_trials_global=trials_per_kernel * len(tasks),
        max_trials_per_task=trials_per_kernel,
        num_trials_per_iter=per_iter,
        builder=builder,
        runner=runner,
        database=database,
        cost_model="xgb",
        measure_callbacks="default",
        task_scheduler="round-robin",
    )


def kernel_bytes(kernel: Kernel, rows: int) -> int:
    """The fewest bytes a kernel must move at M = rows (what its effective bandwidth counts)."""
    item = 4 if kernel.dtype == "float32" else 2
    n = kernel.hidden
    return {
        "forward": 2 * rows * n * item + 8 * rows,
        "forward_stats": rows * n * item + 8 * rows,
        "backward": 3 * rows * n * item + 8 * rows + 8 * kernel.parts * n,
        "backward_sum": 8 * kernel.parts * n + 2 * n * item,
    }[kernel.op]


def summarize(kernels: list[Kernel], target: TargetInfo, log_dir: Path) -> str:
    """A table of each kernel's best measured time in the database and its effective bandwidth."""
    records = read_records(Path(log_dir))
    lines = [f"{'kernel':<44} {'M':>8} {'best us':>9} {'GB/s':>7}  knobs"]
    for k in kernels:
        record = records.get(workload_hash(k, target))
        rows = tune_rows(k, target)
        if record is None:
            lines.append(f"{k.name:<44} {rows:>8} {'-':>9} {'-':>7}  (no valid record)")
            continue
        gbps = kernel_bytes(k, rows) / record.seconds / 1e9
        lines.append(
            f"{k.name:<44} {rows:>8} {record.seconds * 1e6:>9.1f} {gbps:>7.0f}  {choose(k, target, records).knobs}"
        )
    return "\n".join(lines)


def prune(log_dir: Path, keep: int = 3, live: set[str] | None = None) -> tuple[int, int]:
    """Rewrite a JSON database with only the `keep` fastest valid records of each workload.

    Export needs the best record; a few more keep a resumed search seeded. With `live` (workload
    hashes), workloads outside it are dropped too: records of an older definition of a kernel
    match nothing once its TE changes. Returns (records before, after). Damaged lines are dropped
    (with the reader's warning).
    """
    log_dir = Path(log_dir)
    workloads = [entry for _, entry in _json_lines(log_dir / WORKLOADS)]
    by_workload: dict[int, list] = {}
    before = 0
    for _, entry in _json_lines(log_dir / RECORDS):
        before += 1
        try:
            index, (_trace, run_secs, *_rest) = entry
            seconds = measured_seconds(run_secs)
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if seconds is not None:
            by_workload.setdefault(int(index), []).append((seconds, entry))
    used = sorted(i for i in by_workload if live is None or str(workloads[i][0]) in live)
    new_index = {old: new for new, old in enumerate(used)}
    lines = []
    for old in used:
        for _, entry in sorted(by_workload[old], key=lambda item: item[0])[:keep]:
            lines.append(json.dumps([new_index[old], entry[1]]))
    (log_dir / WORKLOADS).write_text("".join(json.dumps(workloads[i]) + "\n" for i in used))
    (log_dir / RECORDS).write_text("".join(line + "\n" for line in lines))
    return before, len(lines)
