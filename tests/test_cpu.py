"""The CPU (llvm) target: made for this host, thread count decided by the loading process, row sums
vectorized, results independent of the thread count, and its design space tunable."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

import lntune
from lntune.build import export, kernel_library, kernels_for
from lntune.files import LibraryError
from schedules import cpu, database, host, rules, spaces
from schedules.knobs import Sampled, decisions_of
from schedules.targets import get_target
from te_ops.layer_norm import Kernel

LLVM = get_target("llvm")
ROOT = Path(__file__).resolve().parent.parent


def test_llvm_target_is_this_host():
    """The CPU LLVM names for this host (its vector units: baseline x86-64 has none past SSE2) and
    the cores this process may use, not a fixed 2."""
    from tvm.target import codegen

    assert LLVM.spec["mcpu"] == codegen.llvm_get_system_cpu()
    assert LLVM.spec["num-cores"] == LLVM.cores == host.host_threads() == len(os.sched_getaffinity(0))
    assert rules.parts_for(LLVM, 1024, "float32") == max(cpu.MIN_PARTS, cpu.PARTS_PER_THREAD * LLVM.cores)


@pytest.mark.parametrize("op", ["forward", "forward_stats", "backward", "backward_sum"])
def test_parallel_loops_leave_the_thread_count_to_the_runtime(op):
    """Every kernel launches its parallel loop with num_task 0: the runtime pool of the process that
    loads the library picks the task count, and each task its share of the loop from it."""
    kernel = next(k for k in kernels_for(1024, "float32", LLVM) if k.op == op)
    ir = kernel_library(kernel, LLVM).mod.inspect_source("ll")
    launches = re.findall(r"call i32 %\w+\(ptr nonnull @__tvm_parallel_lambda[^,]*, ptr [^,]*, i32 (\d+)\)", ir)
    assert launches and set(launches) == {"0"}
    assert "%num_task = load i32" in ir


def test_row_sums_are_vectorized_with_no_workspace_call_per_row():
    """The forward's row sums add whole vectors (rfactored lanes), and its per-row buffers are on the
    stack: no TVMBackendAllocWorkspace call at all (they were 8 a row)."""
    module = kernel_library(Kernel("forward", 1024, "float32"), LLVM).mod
    assert "AllocWorkspace@GOTPCREL" not in module.inspect_source("asm")
    assert re.search(r"fadd[a-z ]* <(8|16|32) x float>", module.inspect_source("ll"))


_CHILD = """
import hashlib, os, sys
import numpy as np
from schedules import host
import lntune
wanted = int(sys.argv[2])
tasks = lambda: len(os.listdir("/proc/self/task"))
before = tasks()
if wanted:
    print("pool", host.configure_thread_pool(wanted))
lib = lntune.load(sys.argv[1])  # sizes the pool to the host unless the process configured it
rng = np.random.default_rng(0)
x = rng.standard_normal((4099, 256), dtype=np.float32)
dy = rng.standard_normal((4099, 256), dtype=np.float32)
gamma = (1 + rng.standard_normal(256, dtype=np.float32) / 8)
y, mean, rstd = lib.forward(x, gamma, gamma)
print("threads", tasks() - before + 1)
digest = hashlib.sha256()
for out in (y, mean, rstd, *lib.backward(dy, x, mean, rstd, gamma)):
    digest.update(np.ascontiguousarray(out).tobytes())
print("digest", digest.hexdigest())
"""


@pytest.fixture(scope="module")
def small_library(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu")
    export("llvm", [256], ["float32"], out, log=lambda *_: None)
    return out


def _run_child(library: Path, threads_env: str | None, configure: int = 0) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    if threads_env is not None:
        env["TVM_NUM_THREADS"] = threads_env
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(library), str(configure)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


def test_the_loading_process_decides_the_threads_and_results_do_not_depend_on_them(small_library):
    """One library (exported here, for this host's cores) runs on as many threads as the loading
    process's pool has: TVM_NUM_THREADS=1 and 6, or configure_thread_pool(4) (threads counted in
    /proc from before the pool exists; the calling thread is one of the pool's). y, mean, rstd, dx
    and the partials' sums are the same bits whatever the count: P and the chunks' order of
    additions are fixed at export."""
    manifest = json.loads((small_library / "manifest.json").read_text())
    assert manifest["target_spec"]["num-cores"] == host.host_threads()
    runs = {n: _run_child(small_library, str(n)) for n in (1, 6)}
    runs["configured"] = _run_child(small_library, None, configure=4)
    assert {n: int(run["threads"]) for n, run in runs.items()} == {1: 1, 6: 6, "configured": 4}
    assert runs["configured"]["pool"] == "4"
    assert len({run["digest"] for run in runs.values()}) == 1


def test_configure_thread_pool_leaves_an_explicit_tvm_num_threads_alone(monkeypatch):
    """Nor does it create the pool then: TVM's pool of one worker binds the calling thread to core 0
    (this process's affinity would shrink to one core for everything after)."""
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    calls = []
    monkeypatch.setattr(tvm, "get_global_func", lambda name, *args: calls.append(name))
    affinity = os.sched_getaffinity(0)
    assert host.configure_thread_pool(3) == 1
    assert calls == [] and os.sched_getaffinity(0) == affinity


@pytest.mark.parametrize("op", ["forward", "forward_stats", "backward", "backward_sum"])
def test_cpu_design_space_samples_its_knobs_and_a_trace_names_them(op):
    """Each CPU design (one per structure) samples its knobs (accumulators; unroll; the sum's
    columns), and the decisions of a sampled trace read back as those knobs (database._knobs_of),
    as a tuned record's do."""
    kernel = next(k for k in kernels_for(1024, "float32", LLVM) if k.op == op)
    for structure in spaces.structures(kernel, LLVM):
        sch = tvm.s_tir.Schedule(database.workload(kernel, LLVM)["main"], seed=11)
        spaces.apply(sch, kernel, LLVM, Sampled(structure))
        decisions = tuple(decisions_of(sch.trace.simplified(remove_postproc=True)))
        knobs = database._knobs_of(kernel, LLVM, decisions, structure)
        assert knobs is not None
        if op != "backward_sum":
            assert knobs["accumulators"] in cpu.accumulator_candidates(kernel)
        assert all(knobs[name] == value for name, value in structure.items())


@pytest.mark.parametrize("hidden", [1, 3, 8, 37, 96])
def test_short_and_odd_rows_build_and_match_the_reference(tmp_path, hidden):
    """Rows too short for vector accumulators (N = 1, odd N) are summed serially; the rest in lanes."""
    from lntune.check import check_variant
    from lntune.runner import load

    export("llvm", [hidden], ["float32", "bfloat16"], tmp_path, log=lambda *_: None)
    lib = load(tmp_path)
    for dtype in ("float32", "bfloat16"):
        for rows in (1, 33):
            bad = [r for r in check_variant(lib, hidden, dtype, rows, np.random.default_rng(hidden)) if not r.ok]
            assert not bad, [(r.op, r.output, r.error) for r in bad]


def test_a_library_for_another_cpu_is_refused_by_name(small_library, tmp_path):
    """Its code may use vector instructions this CPU lacks (an illegal instruction, a dead process):
    refused at load, naming both CPUs, before anything runs."""
    copy = tmp_path / "other"
    shutil.copytree(small_library, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target_spec"]["mcpu"] = "some-other-cpu"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LibraryError, match="exported for CPU some-other-cpu, this host is"):
        lntune.load(copy)
