"""Reads committed tuning logs and answers "which schedule for this kernel on this target".

The logs are MetaSchedule JSON databases (database_workload.json, database_tuning_record.json) under
tuning_logs/<target>/. They are read line by line, so a damaged line costs only its own record (with a
warning naming file and line). A record is matched to a kernel by the structural hash of the kernel's
tuning workload, and used as the knob decisions of its sample_categorical instructions.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import tvm
import tvm_ffi

from schedules import backward, cluster, dependent_launch, knob_sets, private_copies, rewrites, rules, spaces, untuned
from schedules.knobs import IMPLICIT_UNROLL_KEY, Fixed, Recorder
from schedules.targets import TargetInfo
from te_ops.layer_norm import GRANULES, ROW_GRANULE, Kernel

ROOT = Path(__file__).resolve().parent.parent
TUNING_LOGS = ROOT / "tuning_logs"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
TUNE_EPS = 1e-5
# Past the 50 MB L2 of an H100 for the GPU; on a CPU 4096 x 1024, the shape lntune is held to
# against torch's CPU layer_norm (16 MB a tensor, past most L2s).
TUNE_ELEMENTS = {"gpu": 1 << 25, "cpu": 1 << 22}


def tune_rows(kernel: Kernel, target: TargetInfo) -> int:
    """The M at which a kernel is tuned; the tuned schedule is then applied to symbolic M."""
    return max(1, TUNE_ELEMENTS["gpu" if target.is_gpu else "cpu"] // kernel.hidden)


def workload(kernel: Kernel, target: TargetInfo, legacy: bool = False) -> tvm.IRModule:
    """The IRModule MetaSchedule tunes and measures for `kernel` (M fixed to tune_rows).

    The backward's stages are inlined and the result simplified (crow[i, 0] becomes c1[i] / N
    again): the tuning spaces do not stage rows, and the workload (and its hash, which tuned
    records are found by) stays what it was before the stages existed. `legacy`: a forward with
    its statistics as they were before the exact ones (Kernel.has_legacy_workload), only to find
    records tuned then; it is never tuned or built again.
    """
    func = kernel.prim_func(rows=tune_rows(kernel, target), eps=TUNE_EPS, legacy=legacy)
    if kernel.op == "backward":
        sch = tvm.s_tir.Schedule(func)
        backward.inline_stages(sch)
        func = tvm.tirx.transform.StmtSimplify()(sch.mod)["main"]
    return tvm.IRModule({"main": func})


def workload_hash(kernel: Kernel, target: TargetInfo, legacy: bool = False) -> str:
    return str(tvm_ffi.structural_hash(workload(kernel, target, legacy)) % (1 << 64))


def workload_hashes(kernel: Kernel, target: TargetInfo) -> list[str]:
    """The hashes a kernel's tuned records may be found by, in order: its workload's, then (plain
    forward and forward_stats) its workload's before the exact statistics, whose records keep
    their knobs: the schedule and its knobs are the same, one reduction more a row. `lntune
    prune` should keep both."""
    legacy = [workload_hash(kernel, target, legacy=True)] if kernel.has_legacy_workload else []
    return [workload_hash(kernel, target)] + legacy


def find_record(records: dict[str, Record], kernel: Kernel, target: TargetInfo) -> Record | None:
    """The best record of `kernel` under any of its workload_hashes (the first that has one)."""
    return next((records[h] for h in workload_hashes(kernel, target) if h in records), None)


@dataclass(frozen=True)
class Record:
    """The best measured record of one workload: its knob decisions and mean run time."""

    workload_hash: str
    decisions: tuple[int, ...]
    seconds: float
    line: int
    structure: tuple[tuple[str, int], ...] = ()


def _database_lines(path: Path) -> list[tuple[int, object]]:
    """Every line of a MetaSchedule JSON file with its JSON value, numbered as MetaSchedule numbers
    them; None for a line MetaSchedule could not read (blank, cut short, not UTF-8, or JSON that TVM's
    parser rejects), with a warning naming file:line.

    MetaSchedule (json_database.cc) reads a file with std::getline: every piece ending in "\\n" is a
    line, and so is a last piece without one; a record names its workload by that workload's 0-based
    position among the lines, blank or damaged ones included (MetaSchedule itself stops at those).
    """
    if not path.exists():
        return []
    pieces = path.read_bytes().split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    parse = tvm_ffi.get_global_func("ffi.json.Parse")  # what MetaSchedule reads the line with
    lines = []
    for number, raw in enumerate(pieces, start=1):
        try:
            text = raw.decode()
            if not text.strip():
                raise ValueError("blank")
            value = json.loads(text)
            parse(text)
        except Exception as err:  # noqa: BLE001 (UnicodeDecodeError, ValueError, or TVM's parser's error)
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err).splitlines()[0][:80]
            warnings.warn(f"{path}:{number}: skipped a damaged line ({reason})", stacklevel=3)
            value = None
        lines.append((number, value))
    return lines


def _json_lines(path: Path):
    """(line number, JSON value) of each readable line of a MetaSchedule JSON file."""
    for number, value in _database_lines(path):
        if value is not None:
            yield number, value


def _canonical(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _workload_arguments(entry) -> str | None:
    """A workload line's arguments as its records list them (args_info: ["TENSOR", dtype, shape]
    per buffer), canonical JSON; None when the line is no workload MetaSchedule can load."""
    from tvm.s_tir import meta_schedule as ms

    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
        return None
    try:
        mod = ms.database.Workload.from_json(entry).mod
        # The line's hash is the structural hash of its module as written. A byte flipped in the
        # module can still decode to a valid module of another kernel, with the same arguments, and
        # its records would be that kernel's: the hash no longer matches, so the line is refused.
        if entry[0] != str(tvm_ffi.structural_hash(mod) % (1 << 64)):
            return None
        return _canonical([arg.as_json() for arg in ms.arg_info.ArgInfo.from_entry_func(mod)])
    except Exception:  # noqa: BLE001 (TVM raises several kinds for a damaged module)
        return None


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _record_shape_ok(entry) -> bool:
    """[workload index, [trace, run_secs, ...]] with a trace of [instructions, decisions]."""
    if not (isinstance(entry, list) and len(entry) == 2 and _is_index(entry[0])):
        return False
    body = entry[1]
    if not (isinstance(body, list) and len(body) >= 2 and isinstance(body[0], list) and len(body[0]) == 2):
        return False
    return all(isinstance(part, list) for part in body[0])


@dataclass(frozen=True)
class Contents:
    """What a tuning-log folder holds that can be used. workloads: index (the 0-based line position
    records name them by) -> (line number, JSON, canonical arguments); records: (line number, JSON)
    of each record that is well formed, names a usable workload and matches its arguments. dropped:
    lines not used, of both files; clean: nothing dropped and both files end their last line."""

    workloads: dict[int, tuple[int, list, str]]
    records: list[tuple[int, list]]
    dropped: int
    clean: bool


def read_contents(folder: Path) -> Contents:
    """The usable lines of one tuning-log folder, each unusable one warned about with file:line.

    A record is kept only if the arguments it was measured with (its args_info) are its workload's:
    a record numbered for another kernel (a workload line lost or inserted before it) is dropped,
    not used for the wrong kernel.
    """
    folder = Path(folder)
    workload_lines, record_lines = _database_lines(folder / WORKLOADS), _database_lines(folder / RECORDS)
    workloads = {}
    for index, (number, entry) in enumerate(workload_lines):
        arguments = None if entry is None else _workload_arguments(entry)
        if entry is not None and arguments is None:
            warnings.warn(f"{folder / WORKLOADS}:{number}: skipped a malformed workload and its records", stacklevel=2)
        if arguments is not None:
            workloads[index] = (number, entry, arguments)
    records = []
    for number, entry in record_lines:
        if entry is None:
            continue
        why = _record_fault(entry, workloads, folder)
        if why:
            warnings.warn(f"{folder / RECORDS}:{number}: skipped {why}", stacklevel=2)
            continue
        records.append((number, entry))
    dropped = len(workload_lines) - len(workloads) + len(record_lines) - len(records)
    ended = all(not (folder / name).exists() or _ends_line(folder / name) for name in (WORKLOADS, RECORDS))
    return Contents(workloads, records, dropped, dropped == 0 and ended)


def _record_fault(entry, workloads: dict, folder: Path) -> str | None:
    """Why a parsed record line cannot be used, or None."""
    if not _record_shape_ok(entry):
        return "a malformed tuning record"
    index, body = entry
    if index not in workloads:
        return f"a record of workload {index}, which {folder / WORKLOADS} lacks or could not read"
    args_info = body[3] if len(body) > 3 else None
    if args_info is not None and _canonical(args_info) != workloads[index][2]:
        line = workloads[index][0]
        return f"a record whose arguments are not those of workload {index} ({WORKLOADS}:{line}): numbered for another"
    return None


def _ends_line(path: Path) -> bool:
    """The file is empty or ends with a newline (MetaSchedule appends "line\\n" after it)."""
    with path.open("rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return True
        f.seek(-1, 2)
        return f.read(1) == b"\n"


FAILED_SECONDS = 1e9  # MetaSchedule stores a failed build or run as 1e10 s


def measured_seconds(run_secs) -> float | None:
    """The mean run time of a record's measurements; None for a failed candidate."""
    seconds = sum(float(s) for s in run_secs) / len(run_secs)
    return seconds if seconds < FAILED_SECONDS else None


def _decisions(trace_json) -> tuple[int, ...]:
    """The chosen candidate of each SampleCategorical in a serialized trace, in program order.

    One-candidate samples are skipped: they decide nothing (structure markers, or a knob with a single
    choice), and trace simplification keeps some and drops others.
    """
    insts, decisions = trace_json
    chosen = dict((int(i), int(d)) for i, d in decisions)
    values = []
    for index, inst in enumerate(insts):
        if inst[0] == "SampleCategorical" and len(inst[2][0]) > 1:
            candidates = inst[2][0]
            values.append(int(candidates[chosen[index]]))
    return tuple(values)


def _annotation(insts, key: str):
    """The value of the first Annotate instruction with `key` in a serialized trace, else None."""
    return next((inst[1][1] for inst in insts if inst[0] == "Annotate" and inst[2][:1] == [key]), None)


def _structure(trace_json) -> tuple[tuple[str, int], ...]:
    """The structural knobs of a one-pass-backward trace, read off its instructions.

    MetaSchedule simplifies a trace before saving it and drops the one-candidate samples that mark
    the structure (nothing consumes them), so the structure is recovered from what it did: x and dy
    caches are two CacheReads, gamma's is one more; a chunked row split (the one with a sampled
    thread count) puts the thread count first; the step and the unrolling leave annotations.
    """
    insts = trace_json[0]
    if not any(inst[0] == "Merge" for inst in insts) or not any(inst[0] == "DecomposeReduction" for inst in insts):
        return ()
    caches = sum(inst[0] == "CacheRead" for inst in insts)
    sampled = [inst for inst in insts if inst[0] == "Split" and any(str(f).startswith("v") for f in inst[1][1:])]
    chunked = int(bool(sampled) and sampled[0][1][1] != "None")
    return (
        ("cache_rows", int(caches >= 2)),
        ("cache_gamma", caches % 2),
        ("chunked", chunked),
        ("rows_per_step", int(_annotation(insts, backward.ROWS_PER_STEP_KEY) or 1)),
        ("explicit_unroll", int(_annotation(insts, IMPLICIT_UNROLL_KEY) is None)),
    )


def read_records(folder: Path) -> dict[str, Record]:
    """workload hash -> its fastest valid record, from one target's tuning-log folder (read_contents:
    unusable lines are skipped with a warning naming file:line)."""
    contents = read_contents(Path(folder))
    best: dict[str, Record] = {}
    for number, (index, (trace_json, run_secs, *_rest)) in contents.records:
        try:
            seconds = measured_seconds(run_secs)
            workload_hash = str(contents.workloads[index][1][0])
            record = Record(workload_hash, _decisions(trace_json), seconds, number, _structure(trace_json))
        except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError):
            warnings.warn(f"{folder / RECORDS}:{number}: skipped a malformed tuning record", stacklevel=2)
            continue
        if seconds is None:  # a candidate that failed to build or run is no schedule to use
            continue
        if record.workload_hash not in best or seconds < best[record.workload_hash].seconds:
            best[record.workload_hash] = record
    return best


@dataclass(frozen=True)
class Choice:
    """The knobs to schedule a kernel with, and where they came from ("baseline" or "tuned:<...>")."""

    knobs: dict
    source: str


def baseline_knobs(kernel: Kernel, target: TargetInfo) -> dict:
    """The rule-chosen knobs (rules.default_knobs), completed and validated by one dry run."""
    fixed = Fixed(rules.default_knobs(kernel, target))
    spaces.apply(tvm.s_tir.Schedule(kernel.prim_func()), kernel, target, fixed)
    return fixed.used


# A 16-bit kernel without records of its own takes its twin's tuned knobs: the same element size gives
# the same design space (vector width, thread candidates), so the decisions carry over (untimed).
TWIN_DTYPES = {"float16": "bfloat16", "bfloat16": "float16"}


def read_selection(folder: Path) -> dict:
    """selection.json: per kernel, whether its tuned record beat the baseline as exported (lntune select)."""
    path = folder / "selection.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as err:
        warnings.warn(f"{path}: ignored, not valid JSON ({err.msg})", stacklevel=2)
        return {}


def parts_key(hidden: int, dtype: str) -> str:
    """The selection.json key of the P that `lntune select --parts` chose for one (N, dtype)."""
    return f"parts:{dtype}:n{hidden}"


def selected_granule(target: TargetInfo, hidden: int, dtype: str, selection: dict | None = None) -> int:
    """The rows the backward of (hidden, dtype) rounds its chunks to: `lntune select --parts`'s
    choice in selection.json, else te_ops' ROW_GRANULE."""
    if selection is None:
        selection = read_selection(TUNING_LOGS / target.name)
    granule = selection.get(parts_key(hidden, dtype), {}).get("granule", ROW_GRANULE)
    return granule if granule in GRANULES else ROW_GRANULE


def selected_chunking(target: TargetInfo, hidden: int, dtype: str, selection: dict | None = None) -> tuple[int, int]:
    """(P, granule) of the backward of (hidden, dtype), both from the same selection; for an N
    nobody tuned, the rule's (schedules.untuned: P fitted over the tuned N, the granule of the
    tuned N whose knobs it takes)."""
    if selection is None:
        selection = read_selection(TUNING_LOGS / target.name)
    if parts_key(hidden, dtype) not in selection:
        source = rule_source(target, hidden, dtype, selection)
        if source is not None:
            return source.parts, source.granule
    return selected_parts(target, hidden, dtype, selection), selected_granule(target, hidden, dtype, selection)


def selected_parts(target: TargetInfo, hidden: int, dtype: str, selection: dict | None = None) -> int:
    """P for the backward of (hidden, dtype): the measured choice in selection.json, else the rule's."""
    if selection is None:
        selection = read_selection(TUNING_LOGS / target.name)
    parts = selection.get(parts_key(hidden, dtype), {}).get("parts")
    if isinstance(parts, int) and parts > 0:
        return parts
    return rules.parts_for(target, hidden, dtype)


def _timings(verdict: dict) -> str:
    """The chosen candidate's and the baseline's time from a selection.json entry."""
    us = verdict.get("us", {})
    label = verdict.get("label", verdict.get("choice"))
    return f"{us.get(label, '?')} us; baseline {us.get('baseline', '?')} us"


def exact_knobs(kernel: Kernel, target: TargetInfo, knobs) -> dict | None:
    """The complete knobs if every one of `knobs` is a knob of the kernel's space and takes its given
    value, else None. Structural knobs added since take their first candidate (the old structure)."""
    if not isinstance(knobs, dict):
        return None
    fixed = Fixed(knobs)
    try:
        spaces.apply(tvm.s_tir.Schedule(kernel.prim_func()), kernel, target, fixed)
    except Exception:  # noqa: BLE001 (knobs from another version of the space)
        return None
    return fixed.used if all(fixed.used.get(name) == value for name, value in knobs.items()) else None


def _record_sources(kernel: Kernel, target: TargetInfo) -> list[tuple[Kernel, str]]:
    """Whose tuned record a kernel may use, in order: its own; the same kernel at the rule's P (P only
    sizes the row chunks, the knobs do not depend on it); its 16-bit twin's (same vector width and
    thread candidates, so the decisions carry over). All but the first are marked, and untimed."""
    if kernel.granule != ROW_GRANULE:  # chunks of other sizes: the same schedule, records at the default
        return [(kernel, "tuned")] + [
            (k, label if label.startswith("transfer") else "transfer:granule")
            for k, label in _record_sources(replace(kernel, granule=ROW_GRANULE), target)
        ]
    sources = [(kernel, "tuned")]
    rule = rules.parts_for(target, kernel.hidden, kernel.dtype) if kernel.parts else kernel.parts
    if rule != kernel.parts:
        sources.append((replace(kernel, parts=rule), f"transfer:p{rule}"))
    if kernel.dtype in TWIN_DTYPES:
        twin = TWIN_DTYPES[kernel.dtype]
        sources.append((replace(kernel, dtype=twin), f"transfer:{twin}"))
        if rule != kernel.parts:
            sources.append((replace(kernel, dtype=twin, parts=rule), f"transfer:{twin}:p{rule}"))
    return sources


def choose(
    kernel: Kernel, target: TargetInfo, records: dict[str, Record] | None = None, selection: dict | None = None
) -> Choice:
    """The knobs `lntune select` measured fastest as exported (selection.json: baseline, tuned or a
    structural variant); without a verdict, the tuned knobs of the first record _record_sources
    finds, else the baseline's."""
    if records is None:
        records = read_records(TUNING_LOGS / target.name)
    if selection is None:
        selection = read_selection(TUNING_LOGS / target.name)
    if kernel.param_dtype is not None:
        return _from_same_activations(kernel, target, records, selection)
    verdict = selection.get(kernel.name, {})
    if verdict.get("choice") == "baseline":
        return Choice(baseline_knobs(kernel, target), f"baseline (selected: {_timings(verdict)})")
    if verdict.get("choice") == "variant":
        knobs = exact_knobs(kernel, target, verdict.get("knobs"))
        if knobs is not None:
            return Choice(knobs, f"selected:{verdict.get('label', 'variant')} ({_timings(verdict)})")
        warnings.warn(f"{kernel.name}: selected variant does not fit the design space; not used", stacklevel=2)
    sources = _record_sources(kernel, target) if records else []
    found = ((find_record(records, k, target), label) for k, label in sources)  # lazily: hashing costs
    record, prefix = next(((r, label) for r, label in found if r is not None), (None, "tuned"))
    if record is None and target.family == "rocm":
        return _from_cuda(kernel, target)
    if record is None:
        return _by_rule(kernel, target, records, selection) or Choice(baseline_knobs(kernel, target), "baseline")
    knobs = _knobs_of(kernel, target, record.decisions, dict(record.structure))
    if knobs is None:
        warnings.warn(
            f"{kernel.name}: tuned record (line {record.line}) does not fit the design space; using the baseline",
            stacklevel=2,
        )
        return Choice(baseline_knobs(kernel, target), "baseline")
    return Choice(knobs, f"{prefix}:{record.workload_hash}:line{record.line}:{record.seconds * 1e6:.1f}us")


RULE_BASELINE = "baseline (rule: "  # an untuned N's kernel the rule gave the baseline, and why


def rule_source(
    target: TargetInfo, hidden: int, dtype: str, selection: dict, records: dict | None = None
) -> untuned.Source | None:
    """The tuned N whose knobs an untuned (hidden, dtype) takes (schedules.untuned.find_source),
    or None where the rule does not apply (a tuned N, no tuned N of the dtype, a CPU or ROCm target)
    or no tuned N's backward fits. Kept per (target, N, dtype, selection, records): export asks for
    each kernel of a variant."""
    if not untuned.applies(target, hidden, dtype, selection):
        return None
    key = (target.name, hidden, dtype, _fingerprint(selection), tuple(sorted(records or ())))
    if key not in _RULE_SOURCES:
        if len(_RULE_SOURCES) > 256:
            _RULE_SOURCES.clear()

        def choose_tuned(kernel: Kernel) -> Choice:
            return choose(kernel, target, records, selection)

        def exact(kernel: Kernel, knobs: dict) -> dict | None:
            return exact_knobs(kernel, target, knobs)

        _RULE_SOURCES[key] = untuned.find_source(target, hidden, dtype, selection, choose_tuned, exact)
    return _RULE_SOURCES[key]


_RULE_SOURCES: dict[tuple, untuned.Source | None] = {}


def _fingerprint(selection: dict) -> str:
    return hashlib.sha256(json.dumps(selection, sort_keys=True, default=str).encode()).hexdigest()


def _by_rule(kernel: Kernel, target: TargetInfo, records: dict, selection: dict) -> Choice | None:
    """The choice for a kernel of an N nobody tuned (schedules.untuned), or None where the rule
    does not apply: the source N's choice for the same op scaled to this N (its own baseline where
    the source's was), or the baseline, saying why, where no tuned N's backward fits."""
    if not untuned.applies(target, kernel.hidden, kernel.dtype, selection):
        return None
    source = rule_source(target, kernel.hidden, kernel.dtype, selection, records)
    if source is None:
        tried = ", ".join(
            f"n{n}"
            for n in untuned.nearest_first(kernel.hidden, untuned.tuned_hiddens(target, kernel.dtype, selection))
        )
        return Choice(baseline_knobs(kernel, target), f"{RULE_BASELINE}no tuned N's knobs fit; tried {tried})")
    parts, granule = untuned.chunking_of_tuned(target, source.hidden, kernel.dtype, selection)
    twin = replace(kernel, hidden=source.hidden, parts=parts if kernel.parts else 0)
    twin = replace(twin, granule=granule) if kernel.op == "backward" else twin
    chosen = choose(twin, target, records, selection)
    name = f"{untuned.NAME}-n{source.hidden}"
    if chosen.source.startswith("baseline"):
        return Choice(baseline_knobs(kernel, target), f"{RULE_BASELINE}{name}, whose {kernel.op} is the baseline)")
    knobs = untuned.scale(kernel, target, source, chosen, lambda k, v: exact_knobs(k, target, v))
    if knobs is None:
        return Choice(baseline_knobs(kernel, target), f"{RULE_BASELINE}{name}'s {kernel.op} does not fit)")
    return Choice(knobs, untuned.label(source, chosen.source))


def _from_same_activations(kernel: Kernel, target: TargetInfo, records: dict, selection: dict) -> Choice:
    """A mixed-precision kernel (float32 gamma beside 16-bit rows) has no records or selections of
    its own: it takes the choice of the kernel with the same activations and parameters of their
    dtype (same vector width, thread candidates, P and granule), if those knobs fit its space.
    Untimed: fp32 gamma held in registers costs a 16-bit twin's knobs a few more registers."""
    twin = replace(kernel, param_dtype=None)
    chosen = choose(twin, target, records, selection)
    if chosen.source == "baseline":
        return Choice(baseline_knobs(kernel, target), "baseline")
    if chosen.source.startswith(RULE_BASELINE):
        return Choice(baseline_knobs(kernel, target), chosen.source)
    knobs = exact_knobs(kernel, target, chosen.knobs)
    if knobs is not None and chosen.source.startswith("rule:") and kernel.op == "backward":
        # The rule's knobs are checked against the budget of the kernel they build: float32
        # gamma beside 16-bit rows costs registers.
        if not untuned.fits_budget(kernel, target, knobs):
            return Choice(
                baseline_knobs(kernel, target),
                f"{RULE_BASELINE}{chosen.source} does not fit {kernel.params} parameters)",
            )
    if knobs is None:
        warnings.warn(f"{kernel.name}: {twin.name}'s knobs do not fit its space; using the baseline", stacklevel=3)
        return Choice(baseline_knobs(kernel, target), "baseline")
    return Choice(knobs, f"transfer:{twin.dtype}-params:{chosen.source}")


CUDA_SOURCE_OF_ROCM = "cuda-sm90"
NVCC_KNOBS = ("rows_per_step", "explicit_unroll", "shared_acc", "threads_per_sm", "stage_rows")


def _from_cuda(kernel: Kernel, target: TargetInfo) -> Choice:
    """A ROCm kernel without records starts from the CUDA-tuned knobs of the same op, N and dtype,
    mapped onto the ROCm space (values outside its candidates take the ROCm default). Untimed."""
    from schedules.targets import get_target

    cuda = get_target(CUDA_SOURCE_OF_ROCM)
    twin = replace(kernel, parts=selected_parts(cuda, kernel.hidden, kernel.dtype)) if kernel.parts else kernel
    chosen = choose(twin, cuda)
    # The rule for untuned N is for the CUDA kernels it was fitted on: ROCm keeps its baseline there.
    if chosen.source.startswith(("baseline", "rule:")):
        return Choice(baseline_knobs(kernel, target), "baseline")
    # Who unrolls and how many rows a step were chosen for nvcc; with LLVM's AMDGPU backend the
    # implicit unrolling loses the 16-byte loads (measured in the gfx942 ISA), so they stay default.
    carried = {name: value for name, value in chosen.knobs.items() if name not in NVCC_KNOBS}
    fixed = Fixed({**rules.default_knobs(kernel, target), **carried})
    spaces.apply(tvm.s_tir.Schedule(kernel.prim_func()), kernel, target, fixed)
    return Choice(fixed.used, f"transfer:{cuda.name}:untimed:{chosen.source}")


def _knobs_of(kernel: Kernel, target: TargetInfo, decisions: tuple[int, ...], structure: dict) -> dict | None:
    """Name a record's decisions by replaying the space with them; None when they do not fit."""
    values = iter(decisions)

    class Replay(Recorder):
        def pick(self, sch, name, candidates):
            self.values[name] = candidates[0] if len(candidates) == 1 else next(values, None)
            return super().pick(sch, name, candidates)

        def structural(self, sch, name, candidates):
            self.values[name] = structure.get(name, candidates[0])
            return Recorder.pick(self, sch, name, candidates)

    replay = Replay()
    try:
        spaces.apply(tvm.s_tir.Schedule(kernel.prim_func()), kernel, target, replay)
    except Exception:  # noqa: BLE001 (a record from another version of the space)
        return None
    if next(values, None) is not None:  # decisions left over: a record of another space
        return None
    if any(replay.values[n] != replay.used[n] for n in replay.order):
        return None
    return replay.used


# The sum is launched as a programmatic dependent of the backward, which shortens the pair on the
# H100; the backward does not allow it early, which lengthened it (docs/performance.md, section 9).
LAUNCH_ROLES = {"backward_sum": "dependent"}


def scheduled(kernel: Kernel, target: TargetInfo, knobs: dict) -> tvm.tirx.PrimFunc:
    """The symbolic-M PrimFunc of `kernel` scheduled with the given knob values."""
    sch = tvm.s_tir.Schedule(kernel.prim_func())
    fixed = Fixed(knobs)
    spaces.apply(sch, kernel, target, fixed)
    if target.is_gpu:  # the knobs it used are its family's, every one (schedules.knob_sets)
        knob_sets.GPU_KNOB_SETS[kernel.op].from_dict(fixed.used)
    # The exchange first: it rewrites loops and blocks, which launch bounds wrap in an attribute.
    func = cluster.with_cluster_exchange(sch.mod["main"], cluster.protocol_for(fixed.values))
    if target.has_dependent_launch and kernel.op in LAUNCH_ROLES:
        func = dependent_launch.with_dependency(func, LAUNCH_ROLES[kernel.op])
    if fixed.used.get("private_copies"):
        func = func.with_attr(private_copies.PRIVATE_KEY, True)
    func = rewrites.with_launch_bounds(func)
    return func.with_attr("global_symbol", kernel.name)
