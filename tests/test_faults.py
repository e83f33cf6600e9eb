"""Fault injection: kill -9 of `lntune export` and of a process writing a tuning database, then
resume; tuning databases, manifests and libraries cut short or damaged at random byte offsets.

Every fault must leave something usable: the previous export loads (or the new one, whole), a
tuning database opens in MetaSchedule with every sound record kept and none attached to another
kernel, and a damaged export fails with one line naming the file (never SIGBUS). The module counts
faults injected, runs (loads or resumes after a fault) and data lost, and prints one line at the
end (`pytest -s` shows it).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

import lntune
from lntune import files
from lntune.build import export
from schedules import database, rules, spaces
from schedules.knobs import Fixed
from schedules.targets import get_target
from schedules.tune import exclusive, open_database
from te_ops import reference
from te_ops.layer_norm import Kernel

ROOT = Path(__file__).resolve().parent.parent
LLVM = get_target("llvm")
COUNTS: Counter = Counter()  # faults, runs, lost, and what was expected to go


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    print(
        f"\nfault injection: {COUNTS['faults']} faults injected ({COUNTS['kills']} kill -9), {COUNTS['runs']} "
        f"runs after them, {COUNTS['lost']} lost (sound data or a previous export that no longer loads); "
        f"{COUNTS['expected']} damaged records dropped as expected, {COUNTS['altered']} altered values undetectable "
        "(valid JSON, same kernel)"
    )


@pytest.fixture(scope="module")
def previous_export(tmp_path_factory) -> Path:
    """A small llvm export (N = 8): what every killed export must leave loadable."""
    out = tmp_path_factory.mktemp("faults") / "previous"
    export("llvm", [8], ["float32"], out, log=lambda *_: None)
    return out


def _loads_whole(directory: Path) -> int:
    """Load an export and check its forward against float64; returns its hidden size."""
    lib = lntune.load(directory)
    (hidden, dtype, *_), *_ = lib.variants
    x = np.random.default_rng().standard_normal((5, hidden)).astype(np.float32) + 3
    gamma, beta = np.random.default_rng().standard_normal((2, hidden)).astype(np.float32)
    y, _, _ = lib.forward(x, gamma, beta)
    assert reference.rel_error(y, reference.forward(x, gamma, beta, 1e-5)[0]) < reference.TOLERANCE[dtype]
    return hidden


# -- kill -9 of export ------------------------------------------------------------------------------

# The child dies at a chosen point of the export: `digest` (library written, manifest not), `carry`
# (both written, not published), `exchange` (just before the swap), `exchange-after` (published, the
# old folder not yet deleted), `rmtree` (part of the old folder deleted), or `random` (the parent
# kills it a random moment after its imports).
EXPORT_CHILD = r"""
import os, signal, sys, types
from lntune import files
out, point = sys.argv[1], sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def at(name, function):
    def wrapped(*args, **kwargs):
        if point == name:
            die()
        result = function(*args, **kwargs)
        if point == name + "-after":
            die()
        return result
    return wrapped

files.file_digest = at("digest", files.file_digest)
files.carry_other_files = at("carry", files.carry_other_files)
files._exchange = at("exchange", files._exchange)
if point == "rmtree":  # lntune.files' own rmtree only (TVM's temporary folders use shutil's)
    def partial(path, *args, **kwargs):
        os.unlink(os.path.join(path, sorted(os.listdir(path))[0]))
        die()
    files.shutil = types.SimpleNamespace(rmtree=partial)
from lntune.build import export
print("ready", flush=True)
export("llvm", [16], ["float32"], out, log=lambda *_: None)
"""


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: killed whole, nothing left behind
    )


def _kill_after_ready(child: subprocess.Popen, delay: float) -> None:
    """Wait for the child's "ready", then kill its process group after `delay` seconds."""
    child.stdout.readline()
    time.sleep(delay)
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)


def _reap(children: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            pytest.fail("a child process hung")
        child.stdout.close()


def test_export_killed_at_any_moment_leaves_a_loadable_export(previous_export, tmp_path):
    """kill -9 at each step of publishing and at random moments: the folder holds the previous export
    whole or the new one whole; the next export clears what the killed one left beside it."""
    points = ["digest", "carry", "exchange", "exchange-after", "rmtree", "random", "random"]
    outs = [tmp_path / f"out{i}" for i in range(len(points))]
    for out in outs:
        shutil.copytree(previous_export, out)
        (out / "notes.txt").write_text("kept across exports\n")
    children = [_spawn(EXPORT_CHILD, str(out), point) for out, point in zip(outs, points)]
    killers = [
        threading.Thread(target=_kill_after_ready, args=(child, random.uniform(0.0, 1.5)))
        for child, point in zip(children, points)
        if point == "random"
    ]
    for killer in killers:
        killer.start()
    _reap(children)
    for killer in killers:
        killer.join()
    for out, point, child in zip(outs, points, children):
        killed = child.returncode == -signal.SIGKILL
        COUNTS.update(faults=killed, kills=killed, runs=1)
        assert killed or point == "random", (point, child.returncode)
        try:
            hidden = _loads_whole(out)
        except Exception:
            COUNTS["lost"] += 1
            raise
        assert hidden == (16 if point in ("exchange-after", "rmtree") else 8) or point == "random", (point, hidden)
        assert (out / "notes.txt").read_text() == "kept across exports\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers, "the kills should have left staging folders or locks beside the exports"
    for out in outs[:2]:  # not loaded again: this process's dlopen would return the library it has open
        export("llvm", [16], ["float32"], out, log=lambda *_: None)
        assert files.read_manifest(out)["variants"][0]["hidden"] == 16
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]


def test_two_exports_into_one_folder_take_turns(previous_export, tmp_path):
    """A second export waits for the lock of the first (here held by the test) and says so; the
    folder changes only once it has the lock."""
    out = tmp_path / "lib"
    shutil.copytree(previous_export, out)
    said: list[str] = []
    with files.locked(files.lock_path(out)):
        worker = threading.Thread(target=export, args=("llvm", [16], ["float32"], out), kwargs={"log": said.append})
        worker.start()
        deadline = time.monotonic() + 60
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
        assert said and said[0].startswith("waiting for another export into"), said
        assert files.read_manifest(out)["variants"][0]["hidden"] == 8
    worker.join(120)
    assert not worker.is_alive()
    assert _loads_whole(out) == 16
    assert not files.lock_path(out).exists()


def test_output_folders_are_checked_before_compiling(tmp_path, monkeypatch):
    """A bad destination fails at once with one line naming it (nothing compiled or written)."""
    monkeypatch.setattr("lntune.build.compile_module", lambda *a: pytest.fail("compiled before the check"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "nested" / "folder").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cases = {
        "": "non-empty path",
        str(tmp_path / "file"): "is a file",
        str(tmp_path / "file" / "lib"): f"{tmp_path / 'file'} is a file",
        str(tmp_path / "nested"): "holds folders (folder)",
        ".": "current directory",
        "/": "is a mount point",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            export("llvm", [8], ["float32"], path, log=lambda *_: None)
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o555)
        with pytest.raises(ValueError, match="no write permission"):
            export("llvm", [8], ["float32"], tmp_path / "locked" / "lib", log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["file", "nested"] + (["locked"] if os.geteuid() else [])
    )


# -- tuning databases -------------------------------------------------------------------------------

KERNELS = tuple(Kernel("forward_stats", n, "float32") for n in (64, 128, 256))


def _items():
    """(workload module, a trace of its baseline schedule, its args_info) for each kernel."""
    items = []
    for kernel in KERNELS:
        mod = database.workload(kernel, LLVM)
        sch = tvm.s_tir.Schedule(mod["main"])
        spaces.apply(sch, kernel, LLVM, Fixed(rules.default_knobs(kernel, LLVM)))
        items.append((mod, sch.trace, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    return items


def _fill(log_dir: Path, records_per_kernel: int, rng: random.Random) -> None:
    """Commit workloads and records through MetaSchedule's own JSONDatabase (its appends)."""
    db = ms.database.JSONDatabase(work_dir=str(log_dir), module_equality="structural")
    for mod, trace, args in _items():
        workload = db.commit_workload(mod)
        for _ in range(records_per_kernel):
            seconds = [rng.uniform(1e-5, 1e-3)]
            db.commit_tuning_record(ms.database.TuningRecord(trace, workload, seconds, LLVM.tvm_target(), args))


WRITER_CHILD = r"""
import random, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_faults import _fill
from schedules.tune import exclusive, prune
log_dir = Path(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
with exclusive(log_dir):
    print("ready", flush=True)
    while True:  # MetaSchedule's appends, then lntune's rewrite (prune), until killed
        _fill(log_dir, 3, rng)
        prune(log_dir, keep=4)
"""


def _pairs(log_dir: Path) -> list[tuple[int, str]]:
    """(structural hash of the workload's module, record body) of every record, read as MetaSchedule
    numbers them. The module, not the line's text or hash string: a changed byte there may leave
    the same kernel (TVM's base64 reader skips a stray character)."""
    workloads = [json.loads(line) for line in (log_dir / database.WORKLOADS).read_text().splitlines()]
    modules = [tvm_ffi.structural_hash(ms.database.Workload.from_json(w).mod) for w in workloads]
    records = [json.loads(line) for line in (log_dir / database.RECORDS).read_text().splitlines()]
    return [(modules[index], json.dumps(body)) for index, body in records]


def test_killed_while_writing_a_tuning_database_then_resume(tmp_path):
    """kill -9 of a process appending through MetaSchedule and rewriting through prune, at random
    moments: the next run opens the database (repairing it) and keeps every record's kernel."""
    dirs = [tmp_path / f"db{i}" for i in range(3)]
    children = []
    for i, log_dir in enumerate(dirs):
        log_dir.mkdir()
        children.append(_spawn(WRITER_CHILD, str(log_dir), str(i)))
    killers = [threading.Thread(target=_kill_after_ready, args=(c, random.uniform(0.3, 2.0))) for c in children]
    for killer in killers:
        killer.start()
    for killer in killers:
        killer.join()
    _reap(children)
    modules = {tvm_ffi.structural_hash(mod) for mod, _, _ in _items()}
    for log_dir, child in zip(dirs, children):
        COUNTS.update(faults=1, kills=1, runs=1)
        assert child.returncode == -signal.SIGKILL
        with exclusive(log_dir), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            db = open_database(log_dir)
        pairs = _pairs(log_dir)
        assert len(db.get_all_tuning_records()) == len(pairs)
        assert {module for module, _ in pairs} <= modules
        assert database.read_contents(log_dir).clean


def _base_database(folder: Path) -> dict[str, str]:
    folder.mkdir()
    _fill(folder, 4, random.Random(0))
    return {body: module for module, body in _pairs(folder)}


def _damage(folder: Path, rng: random.Random) -> tuple[str, set[int], set[int]]:
    """One random fault: a file cut at a random byte, a random byte of a random line changed, a
    blank line inserted, or a line deleted. Returns its name and the (0-based) lines of each file it
    touched (workloads, records)."""
    name = rng.choice([database.WORKLOADS, database.RECORDS])
    path = folder / name
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]
    kind = rng.choice(["truncate", "flip", "blank", "delete"])
    if kind == "truncate":
        at = rng.randrange(len(data))
        path.write_bytes(data[:at])
        touched = {i for i in range(len(lines)) if sum(len(x) + 1 for x in lines[: i + 1]) > at}
    else:
        i = rng.randrange(len(lines))
        if kind == "flip":
            line = bytearray(lines[i])
            line[rng.randrange(len(line))] = rng.choice(b'0123456789[]{},":. aZ\x00\xff')
            lines[i] = bytes(line)
        elif kind == "blank":
            lines.insert(i, b"")
        else:
            del lines[i]
        path.write_bytes(b"".join(x + b"\n" for x in lines))
        if name == database.RECORDS:  # a record names its workload itself: only its own line counts
            touched = set() if kind == "blank" else {i}
        else:  # workloads are named by position: a line in or out renumbers every one after it
            touched = {i} if kind == "flip" else set(range(i, len(lines) + 1))
    return f"{kind} {name}", *((touched, set()) if name == database.WORKLOADS else (set(), touched))


def test_databases_cut_or_damaged_at_random_offsets_open_again(tmp_path):
    """Each random fault, then repair and open: MetaSchedule opens the result, every record whose line
    and workload line were untouched survives, and none is attached to another kernel."""
    base = tmp_path / "base"
    original = _base_database(base)  # record body -> workload module
    base_workloads = (base / database.WORKLOADS).read_text().splitlines()
    base_records = [json.loads(line) for line in (base / database.RECORDS).read_text().splitlines()]
    rng = random.Random()
    for run in range(60):
        folder = tmp_path / f"run{run}"
        shutil.copytree(base, folder)
        fault, workload_lines, record_lines = _damage(folder, rng)
        with exclusive(folder), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            db = open_database(folder)  # must not raise
        COUNTS.update(faults=1, runs=1)
        pairs = _pairs(folder)
        assert len(db.get_all_tuning_records()) == len(pairs), fault
        sound = {
            json.dumps(body)
            for i, (index, body) in enumerate(base_records)
            if i not in record_lines and index not in workload_lines and index < len(base_workloads)
        }
        kept = {body for _, body in pairs}
        COUNTS["lost"] += len(sound - kept)
        COUNTS["expected"] += len(original) - len(kept & set(original))
        COUNTS["altered"] += len(kept - set(original))
        assert sound <= kept, fault
        for module, body in pairs:
            assert original.get(body, module) == module, f"{fault}: a record moved to another kernel"


# -- manifests and libraries ------------------------------------------------------------------------


def _copy(previous_export: Path, folder: Path) -> Path:
    shutil.copytree(previous_export, folder)
    return folder


def _fails_in_one_line(folder: Path, names: str) -> None:
    with pytest.raises(files.LibraryError) as caught:
        files.read_manifest(folder)
    message = str(caught.value)
    assert "\n" not in message and names in message, message


def test_manifests_cut_at_random_offsets_fail_in_one_line(previous_export, tmp_path):
    text = (previous_export / files.MANIFEST).read_bytes()
    for run, at in enumerate(random.Random().sample(range(len(text) - 1), 25)):
        folder = _copy(previous_export, tmp_path / f"m{run}")
        (folder / files.MANIFEST).write_bytes(text[:at])
        COUNTS.update(faults=1, runs=1)
        _fails_in_one_line(folder, str(folder / files.MANIFEST))


def test_libraries_cut_at_random_offsets_are_caught_before_loading(previous_export, tmp_path):
    """By the recorded size (and sha256), and for an export that records neither, by the ELF's own
    headers: either way before dlopen, which would die of SIGBUS on a mapping past the end."""
    blob = (previous_export / files.LIBRARY).read_bytes()
    for run, at in enumerate(random.Random().sample(range(len(blob)), 20)):
        folder = _copy(previous_export, tmp_path / f"l{run}")
        (folder / files.LIBRARY).write_bytes(blob[:at])
        COUNTS.update(faults=1, runs=2)
        _fails_in_one_line(folder, str(folder / files.LIBRARY))
        manifest = json.loads((folder / files.MANIFEST).read_text())
        del manifest["library_bytes"], manifest["library_sha256"]  # as exports before both were recorded
        (folder / files.MANIFEST).write_text(json.dumps(manifest))
        _fails_in_one_line(folder, str(folder / files.LIBRARY))
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    folder = _copy(previous_export, tmp_path / "flipped")
    (folder / files.LIBRARY).write_bytes(bytes(flipped))
    COUNTS.update(faults=1, runs=1)
    _fails_in_one_line(folder, "sha256")


def test_lntune_check_of_a_cut_library_prints_one_line_not_sigbus(previous_export, tmp_path):
    folder = _copy(previous_export, tmp_path / "cut")
    blob = (folder / files.LIBRARY).read_bytes()
    (folder / files.LIBRARY).write_bytes(blob[: len(blob) // 2])
    manifest = json.loads((folder / files.MANIFEST).read_text())
    del manifest["library_bytes"], manifest["library_sha256"]
    (folder / files.MANIFEST).write_text(json.dumps(manifest))
    done = subprocess.run(
        [sys.executable, "-m", "lntune", "check", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    COUNTS.update(faults=1, runs=1)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.strip().count("\n") == 0 and "is cut short" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: {}, "'target' must be a non-empty string"),
        (lambda m: [], "must hold a JSON object"),
        (lambda m: {**m, "device": "tpu"}, "'device' must be one of"),
        (lambda m: {**m, "variants": []}, "'variants' must be a non-empty list"),
        (lambda m: {**m, "variants": m["variants"][1:]}, "lacks its forward kernel"),
        (lambda m: {**m, "variants": m["variants"] + m["variants"][:1]}, r"variants\[4\] repeats forward"),
        (lambda m: {**m, "variants": [{**m["variants"][0], "hidden": "8"}] + m["variants"][1:]}, "hidden must be"),
        (lambda m: {**m, "variants": [{**m["variants"][0], "dtype": "int8"}] + m["variants"][1:]}, "dtype must be"),
        (lambda m: {**m, "variants": [{**m["variants"][0], "param_dtype": 3}] + m["variants"][1:]}, "param_dtype"),
        (lambda m: {**m, "library_bytes": -1}, "'library_bytes' must be"),
        (lambda m: {**m, "library_sha256": "abc"}, "'library_sha256' must be"),
    ],
)
def test_a_manifest_with_wrong_fields_fails_in_one_line(previous_export, tmp_path, change, message):
    folder = _copy(previous_export, tmp_path / "m")
    manifest = json.loads((folder / files.MANIFEST).read_text())
    (folder / files.MANIFEST).write_text(json.dumps(change(manifest)))
    COUNTS.update(faults=1, runs=1)
    _fails_in_one_line(folder, message.replace("\\", ""))
    with pytest.raises(files.LibraryError, match=message):
        lntune.load(folder)


def test_manifest_defaults_param_dtype_and_names_a_missing_function(previous_export, tmp_path):
    folder = _copy(previous_export, tmp_path / "m")
    manifest = json.loads((folder / files.MANIFEST).read_text())
    for variant in manifest["variants"]:
        variant.pop("param_dtype", None)
    (folder / files.MANIFEST).write_text(json.dumps(manifest))
    assert {v["param_dtype"] for v in files.read_manifest(folder)["variants"]} == {"float32"}
    manifest["variants"][2]["function"] = "lntune_backward_float32_n9"
    (folder / files.MANIFEST).write_text(json.dumps(manifest))
    module = tvm.runtime.load_module(str(folder / files.LIBRARY))
    with pytest.raises(files.LibraryError, match="lacks lntune_backward_float32_n9, the manifest's backward"):
        files.check_functions(files.read_manifest(folder), module, folder / files.LIBRARY)
    files.check_functions(files.read_manifest(previous_export), module, folder / files.LIBRARY)
    COUNTS.update(faults=1, runs=1)
    with pytest.raises(files.LibraryError, match="lacks lntune_backward_float32_n9"):
        lntune.load(folder)


def test_a_library_exported_again_at_the_same_place_loads_anew_in_one_process(previous_export, tmp_path):
    """dlopen hands back what the process already has open under a path; loadable_path gives the
    library exported there since a private path, so its new functions are found."""
    out = tmp_path / "lib"
    shutil.copytree(previous_export, out)
    first = tvm.runtime.load_module(files.loadable_path(out / files.LIBRARY))
    assert first.implements_function("lntune_forward_float32_n8")
    export("llvm", [16], ["float32"], out, log=lambda *_: None)
    stale = tvm.runtime.load_module(str((out / files.LIBRARY).resolve()))
    assert not stale.implements_function("lntune_forward_float32_n16")  # why loadable_path exists
    fresh = tvm.runtime.load_module(files.loadable_path(out / files.LIBRARY))
    assert fresh.implements_function("lntune_forward_float32_n16")
    assert files.loadable_path(out / files.LIBRARY) == files.loadable_path(out / files.LIBRARY)  # one copy
