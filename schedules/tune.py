"""The tuning driver: one MetaSchedule task per kernel, our design spaces, a resumable JSON database."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import warnings
from pathlib import Path

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from lntune import files
from schedules import rewrites, spaces
from schedules.database import (
    RECORDS,
    TUNING_LOGS,
    WORKLOADS,
    choose,
    find_record,
    measured_seconds,
    read_contents,
    read_records,
    tune_rows,
    workload,
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
    if rewrites.needs_unbound_pair(kernel, target):
        postprocs.append(UnbindPairReduction())
    return ms.space_generator.ScheduleFn(
        sample, sch_rules=[], postprocs=postprocs, mutator_probs={ms.mutator.MutateUnroll(): 1.0}
    )


@derived_object
class UnbindPairReduction(ms.postproc.PyPostproc):
    """rewrites.unbind_pair_reduction on each candidate (a CPU bfloat16 backward needs it to build)."""

    def _initialize_with_tune_context(self, context: ms.TuneContext) -> None:
        pass

    def apply(self, sch) -> bool:
        rewrites.unbind_pair_reduction(sch)
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
    """Tune `kernels`, appending to (and resuming from) the JSON database in `log_dir`; a database a
    crash or damage left unreadable is repaired first (`open_database`)."""
    if not kernels:
        raise ValueError("no kernels to tune")
    if isinstance(trials_per_kernel, bool) or not isinstance(trials_per_kernel, int) or trials_per_kernel < 1:
        raise ValueError(f"trials per kernel must be a positive integer, got {trials_per_kernel!r}")
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
    database = open_database(log_dir)
    tasks = [tune_context(k, target, seed) for k in kernels]
    per_iter = min(32, trials_per_kernel)
    builder = ms.builder.LocalBuilder(max_workers=workers, timeout_sec=builder_timeout, f_build=build_candidate)
    if runner == "local":
        runner = ms.runner.LocalRunner(evaluator_config=EVALUATOR)
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.INFO)
    try:
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
    finally:
        # The runner's worker processes live as long as its pool, which TVM only shuts down when the
        # runner is garbage-collected; a reference held elsewhere (FFI) left them orphaned.
        pool = getattr(runner, "pool", None)
        if pool is not None:
            pool.shutdown()


def build_candidate(mod, target, _params):
    """MetaSchedule's build of a candidate (in LocalBuilder's worker processes) as lntune builds its
    kernels: MetaSchedule's default build (tvm.tirx.build after RemoveWeightLayoutRewriteBlock; a
    runtime Module, which its export step takes) with lntune's pass configuration and TIR pipeline, its
    hooks in force for the build (schedules.hooks), so what is measured is what export builds."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from lntune.build import PASS_CONFIG
    from schedules import hooks, pipeline

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with hooks.installed(target), tvm.transform.PassContext(config=PASS_CONFIG):
        return tvm.tirx.build(mod, target=target, pipeline=pipeline.PIPELINE)


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
        record = find_record(records, k, target)
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
    match nothing once its TE changes. Returns (record lines before, records after). Damaged lines,
    and records that do not match their workload, are dropped (with read_contents' warnings).
    Call it holding `exclusive(log_dir)`.
    """
    log_dir = Path(log_dir)
    _finish_rewrite(log_dir)
    contents = read_contents(log_dir)
    before = _line_count(log_dir / RECORDS)
    timed: dict[int, list[tuple[float, list]]] = {}
    for _, entry in contents.records:
        try:
            seconds = measured_seconds(entry[1][1])
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if seconds is not None:
            timed.setdefault(entry[0], []).append((seconds, entry))
    kept = [
        entry
        for index in sorted(timed)
        if live is None or str(contents.workloads[index][1][0]) in live
        for _, entry in sorted(timed[index], key=lambda item: item[0])[:keep]
    ]
    used = sorted({entry[0] for entry in kept})
    _rewrite(log_dir, [contents.workloads[i][1] for i in used], kept, {old: new for new, old in enumerate(used)})
    return before, len(kept)


def repair(log_dir: Path, replay: bool = False) -> int:
    """Make a tuning database MetaSchedule can open again after a crash or damage, before it does.

    MetaSchedule reads every line and stops at the first it cannot parse (a line cut short by a
    crash mid-append) without naming the file. So: an interrupted rewrite is finished; lines that
    cannot be used are dropped, each warned about with file:line (read_contents: damaged, or a
    record numbered for another kernel), with the records of a dropped workload; once anything is
    wrong (or with `replay`), so are records MetaSchedule cannot replay (valid JSON, but a damaged
    instruction, say); repeated workloads are merged; the rest is renumbered and both files are
    rewritten together (`_rewrite`). Returns the lines dropped or merged away. Hold `exclusive(log_dir)`.
    """
    log_dir = Path(log_dir)
    _finish_rewrite(log_dir)
    contents = read_contents(log_dir)
    records = [entry for _, entry in contents.records]
    if replay or not contents.clean:  # replaying costs ~1-10 ms a record: only when something is wrong
        records = _replayable(log_dir, contents)
    first_of: dict[str, int] = {}  # a repeated workload's records go to its first line
    for index, (_, entry, _) in contents.workloads.items():
        first_of.setdefault(entry[0], index)
    merged = len(contents.workloads) - len(first_of)
    dropped = contents.dropped + len(contents.records) - len(records) + merged
    if dropped == 0 and contents.clean:
        return 0
    used = sorted(first_of.values())
    position = {old: new for new, old in enumerate(used)}
    new_index = {old: position[first_of[entry[0]]] for old, (_, entry, _) in contents.workloads.items()}
    _rewrite(log_dir, [contents.workloads[i][1] for i in used], records, new_index)
    warnings.warn(f"{log_dir}: repaired the tuning database ({dropped} lines dropped)", stacklevel=2)
    return dropped


def open_database(log_dir: Path) -> ms.database.JSONDatabase:
    """MetaSchedule's JSON database in `log_dir`, repaired first (`repair`). Where it still fails to
    open (a record MetaSchedule cannot replay in a database that looked whole), every record is
    replayed, those that fail are dropped, and it is opened again. Call it holding `exclusive`."""
    repair(log_dir)
    try:
        return ms.database.JSONDatabase(work_dir=str(log_dir), module_equality="structural")
    except Exception as err:  # noqa: BLE001 (TVM raises ValueError, RuntimeError or InternalError)
        if not repair(log_dir, replay=True):
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RuntimeError(f"MetaSchedule cannot open the tuning database in {log_dir}: {first}") from None
    return ms.database.JSONDatabase(work_dir=str(log_dir), module_equality="structural")


def _replayable(log_dir: Path, contents) -> list:
    """The records of `contents` that MetaSchedule's TuningRecord.from_json accepts; the others are
    warned about with file:line."""
    loaded = {i: ms.database.Workload.from_json(entry) for i, (_, entry, _) in contents.workloads.items()}
    kept = []
    for number, entry in contents.records:
        try:
            ms.database.TuningRecord.from_json(entry[1], loaded[entry[0]])
        except Exception as err:  # noqa: BLE001 (any failure to replay means MetaSchedule fails too)
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1][:100]
            message = f"{log_dir / RECORDS}:{number}: skipped a record MetaSchedule cannot replay ({reason})"
            warnings.warn(message, stacklevel=3)
            continue
        kept.append(entry)
    return kept


# A rewrite of the two files commits at this mark: written once both new files are complete, removed
# once both replaced the old. Renaming two files is not one step; a crash between them would pair
# new workloads with old records, numbered for others.
REWRITE_MARK = "rewrite.pending"
NEW_SUFFIX = ".new"


def _rewrite(log_dir: Path, workloads: list, records: list, new_index: dict[int, int]) -> None:
    """Replace both files of a database together: `workloads` in order, and `records` with their
    workload index renumbered by `new_index`."""
    texts = {
        WORKLOADS: "".join(json.dumps(w) + "\n" for w in workloads),
        RECORDS: "".join(json.dumps([new_index[index], body]) + "\n" for index, body in records),
    }
    for name, text in texts.items():
        files.write_text_atomic(log_dir / (name + NEW_SUFFIX), text)
    files.write_text_atomic(log_dir / REWRITE_MARK, "".join(name + "\n" for name in texts))
    _finish_rewrite(log_dir)


def _finish_rewrite(log_dir: Path) -> None:
    """Complete a committed rewrite that a crash interrupted, or discard one that never committed."""
    mark = log_dir / REWRITE_MARK
    for name in (WORKLOADS, RECORDS):
        new = log_dir / (name + NEW_SUFFIX)
        if mark.exists() and new.exists():
            os.replace(new, log_dir / name)
        elif new.exists():
            new.unlink()
    if mark.exists():
        files.fsync_directory(log_dir)
        mark.unlink()


def _line_count(path: Path) -> int:
    """Lines as MetaSchedule counts them (a last one without a newline too)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    return data.count(b"\n") + (not data.endswith(b"\n") and bool(data))
