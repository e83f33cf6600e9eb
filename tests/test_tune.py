"""The tuning driver end to end on the CPU: MetaSchedule measures our design space, writes and prunes
its database, resumes from it, and export then uses the tuned record."""

import json
import random
import warnings

import numpy as np
import pytest
from tvm.s_tir import meta_schedule as ms

from lntune.build import export, kernel_library
from schedules import database
from schedules.targets import get_target
from schedules.tune import REWRITE_MARK, _finish_rewrite, open_database, prune, repair, summarize, tune
from te_ops.layer_norm import Kernel

LLVM = get_target("llvm")


def workload_line(kernel: Kernel) -> tuple[list, list]:
    """A real workload line of `kernel` on llvm and the args_info its records carry."""
    mod = database.workload(kernel, LLVM)
    args = [arg.as_json() for arg in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]
    return ms.database.Workload(mod).as_json(), json.loads(json.dumps(args))


def record_line(index: int, seconds: float, args: list) -> str:
    """A record MetaSchedule can read (an empty trace replays on any workload)."""
    return json.dumps([index, [[[], []], [seconds], {"kind": "llvm"}, args]])


def write_database(folder, workloads: list[str], records: list[str]) -> None:
    (folder / database.WORKLOADS).write_text("".join(line + "\n" for line in workloads))
    (folder / database.RECORDS).write_text("".join(line + "\n" for line in records))


A, B = Kernel("forward_stats", 64, "float32"), Kernel("forward_stats", 128, "float32")


def test_tune_writes_records_that_export_uses(tmp_path):
    target = get_target("llvm")
    kernel = Kernel("forward_stats", 64, "float32")
    log_dir = tmp_path / "llvm"
    tune([kernel], target, 2, log_dir=log_dir, workers=1, seed=1)
    records = database.read_records(log_dir)
    assert database.workload_hash(kernel, target) in records
    lines = (log_dir / database.RECORDS).read_text().splitlines()
    # A crash mid-append cuts the last line short; a damaged line sits in the middle. MetaSchedule
    # alone cannot open that ("Unexpected EOF", no file named); tune repairs it and resumes.
    cut = lines[0][: random.randrange(1, len(lines[0]))]
    (log_dir / database.RECORDS).write_text("\n".join([lines[0], "{damaged", *lines[1:], cut]))
    with pytest.warns(UserWarning) as caught:
        tune([kernel], target, 2, log_dir=log_dir, workers=1, seed=2)  # resumes: earlier records stay
    messages = [str(w.message) for w in caught]
    assert any(f"{database.RECORDS}:2: skipped a damaged line" in m for m in messages), messages
    assert any(f"{database.RECORDS}:{len(lines) + 2}: skipped a damaged line" in m for m in messages), messages
    resumed = (log_dir / database.RECORDS).read_text().splitlines()
    assert set(lines) <= set(resumed) or len(resumed) == 3  # kept, unless pruned to the 3 best
    assert "forward_stats" in summarize([kernel], target, log_dir)
    manifest = export("llvm", [64], ["float32"], tmp_path / "lib", logs_dir=tmp_path, log=lambda *_: None)
    sources = {v["op"]: v["schedule"] for v in manifest["variants"]}
    assert sources["forward_stats"].startswith("tuned:")
    assert sources["forward"] == "baseline"


def test_prune_keeps_the_fastest_records(tmp_path):
    workload, args = workload_line(A)
    records = [record_line(0, s, args) for s in (3e-4, 1e-4, 1e10, 2e-4, 5e-4)]
    write_database(tmp_path, [json.dumps(workload)], records)
    assert prune(tmp_path, keep=2) == (5, 2)
    kept = [json.loads(line)[1][1][0] for line in (tmp_path / database.RECORDS).read_text().splitlines()]
    assert kept == [1e-4, 2e-4]
    assert prune(tmp_path, keep=2, live={workload[0]}) == (2, 2)
    assert prune(tmp_path, keep=2, live={"456"}) == (2, 0)  # a workload no current kernel has
    assert (tmp_path / database.WORKLOADS).read_text() == ""


def test_records_name_workloads_by_line_position(tmp_path):
    """As MetaSchedule numbers them: a damaged workload line still counts, so the records after it
    keep their kernels, and only its own records go (each warned about with file:line)."""
    (wa, args_a), (wb, args_b) = workload_line(A), workload_line(B)
    workloads = [json.dumps(wa)[:50], json.dumps(wa), json.dumps(wb)]  # line 1 cut short
    write_database(tmp_path, workloads, [record_line(0, 1e-4, args_a), record_line(1, 2e-4, args_a)])
    (tmp_path / database.RECORDS).write_text(
        (tmp_path / database.RECORDS).read_text() + record_line(2, 3e-4, args_b) + "\n"
    )
    with pytest.warns(UserWarning) as caught:
        records = database.read_records(tmp_path)
    assert {h: r.seconds for h, r in records.items()} == {wa[0]: 2e-4, wb[0]: 3e-4}
    messages = " | ".join(str(w.message) for w in caught)
    assert f"{database.WORKLOADS}:1: skipped a damaged line" in messages
    assert f"{database.RECORDS}:1: skipped a record of workload 0" in messages


def test_a_record_numbered_for_another_kernel_is_dropped(tmp_path):
    """A record whose arguments are not its workload's (a workload line lost before it) is dropped
    with a warning, not used as the other kernel's schedule."""
    (wa, args_a), (wb, _) = workload_line(A), workload_line(B)
    write_database(tmp_path, [json.dumps(wa), json.dumps(wb)], [record_line(1, 1e-4, args_a)])
    with pytest.warns(UserWarning, match=r"database_tuning_record.json:1: .* not those of workload 1"):
        assert database.read_records(tmp_path) == {}
    with pytest.warns(UserWarning, match="numbered for another"):
        assert prune(tmp_path) == (1, 0)


def test_prune_and_repair_survive_any_damage(tmp_path):
    """Out-of-range indices, wrong types, blank and cut lines, a duplicated workload: prune and repair
    keep what is sound, renumbered, and MetaSchedule opens the result."""
    (wa, args_a), (wb, args_b) = workload_line(A), workload_line(B)
    workloads = ["", json.dumps(wa), "[1, 2]", json.dumps(wb), json.dumps(wa)]
    records = [
        record_line(1, 1e-4, args_a),
        record_line(3, 2e-4, args_b),
        record_line(4, 3e-4, args_a),  # the duplicate of workload 1: merged
        record_line(9, 1e-4, args_a),  # no such workload
        json.dumps(["1", [[[], []], [1e-4], {"kind": "llvm"}, args_a]]),
        json.dumps([1, "x"]),
        "[1, [[[], []], [1e-4",
    ]
    write_database(tmp_path, workloads, records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert repair(tmp_path) == 2 + 4 + 1  # 2 workload lines and 4 record lines unusable, 1 merged away
        db = open_database(tmp_path)
    assert len(db.get_all_tuning_records()) == 3
    assert [json.loads(line)[0] for line in (tmp_path / database.WORKLOADS).read_text().splitlines()] == [wa[0], wb[0]]
    indices = [json.loads(line)[0] for line in (tmp_path / database.RECORDS).read_text().splitlines()]
    assert indices == [0, 1, 0]
    assert repair(tmp_path) == 0  # whole now: left as it is
    assert prune(tmp_path, keep=1) == (3, 2)


def test_an_interrupted_rewrite_completes_or_never_happened(tmp_path):
    """Both files are replaced together: once the mark is written the rewrite is finished by the next
    run, before it the new files are discarded; a crash between the two renames cannot pair new
    workloads with old records."""
    (wa, args_a), (wb, args_b) = workload_line(A), workload_line(B)
    write_database(tmp_path, [json.dumps(wa)], [record_line(0, 1e-4, args_a)])
    new = {database.WORKLOADS: json.dumps(wb) + "\n", database.RECORDS: record_line(0, 2e-4, args_b) + "\n"}
    for name, text in new.items():
        (tmp_path / (name + ".new")).write_text(text)
    _finish_rewrite(tmp_path)  # no mark: never committed
    assert json.loads((tmp_path / database.WORKLOADS).read_text())[0] == wa[0]
    for name, text in new.items():
        (tmp_path / (name + ".new")).write_text(text)
    (tmp_path / REWRITE_MARK).write_text("")
    (tmp_path / (database.WORKLOADS + ".new")).replace(tmp_path / database.WORKLOADS)  # crashed here
    _finish_rewrite(tmp_path)
    assert {h: r.seconds for h, r in database.read_records(tmp_path).items()} == {wb[0]: 2e-4}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(new)


def test_tuning_through_an_rpc_tracker_uses_both_servers(tmp_path, capsys):
    """A tracker and two servers on loopback measure one job: every trial recorded once, both used."""
    from lntune.cli import main
    from schedules.rpc import measurements_per_server

    log_dir = tmp_path / "llvm"
    argv = [
        "tune",
        "--target",
        "llvm",
        "--hidden",
        "64",
        "--dtype",
        "float32",
        "--ops",
        "forward_stats",
        "--trials",
        "4",
        "--workers",
        "1",
        "--local-servers",
        "2",
        "--log-dir",
        str(log_dir),
    ]
    assert main(argv) == 0
    per_server = measurements_per_server(log_dir / "rpc")
    assert len(per_server) == 2 and all(n >= 1 for n in per_server), per_server
    kernel = Kernel("forward_stats", 64, "float32")
    records = (log_dir / database.RECORDS).read_text().splitlines()
    assert 1 <= len(records) <= 3  # pruned to the best 3 of the measured trials
    assert sum(per_server) >= 4  # each trial measured once; none lost
    assert database.workload_hash(kernel, get_target("llvm")) in database.read_records(log_dir)
    assert "measurements per RPC server" in capsys.readouterr().out
    manifest = export("llvm", [64], ["float32"], tmp_path / "lib", logs_dir=tmp_path, log=lambda *_: None)
    assert {v["op"]: v["schedule"] for v in manifest["variants"]}["forward_stats"].startswith("tuned:")


def test_prune_command_drops_workloads_of_no_current_kernel(tmp_path, capsys):
    """`lntune prune` keeps a record of a current kernel's workload and drops an unknown one."""
    from lntune.cli import main

    kernel = Kernel("forward_stats", 64, "float32")
    (current, args), (stale, stale_args) = workload_line(kernel), workload_line(B)
    stale[0] = "999"  # a workload of no current kernel
    write_database(
        tmp_path,
        [json.dumps(current), json.dumps(stale)],
        [record_line(0, 1e-4, args), record_line(1, 1e-4, stale_args)],
    )
    assert main(["prune", "--target", "llvm", "--hidden", "64", "--dtype", "float32", "--log-dir", str(tmp_path)]) == 0
    assert "2 records -> 1" in capsys.readouterr().out
    assert json.loads((tmp_path / database.WORKLOADS).read_text())[0] == current[0]


def test_a_spawning_rpc_server_loads_and_runs_a_module_and_logs_it(tmp_path):
    """GPU servers spawn each session (a forked child cannot use CUDA); on the CPU the same server
    mode serves an uploaded module, and its log still counts the measurement."""
    import tvm
    from tvm import rpc as tvm_rpc

    from schedules import rpc

    assert "--no-fork" in rpc.server_command(1, 2, "k", forked_sessions=False)
    assert "--no-fork" not in rpc.server_command(1, 2, "k", forked_sessions=True)
    kernel = Kernel("forward_stats", 64, "float32")
    target = get_target("llvm")
    lib = kernel_library(kernel, target, {})
    lib.export_library(str(tmp_path / "k.so"))
    with rpc.local_rpc(1, "spawn", tmp_path / "rpc", forked_sessions=False) as tracker:
        host, port = rpc.parse_address(tracker)
        session = tvm_rpc.connect_tracker(host, port).request("spawn", session_timeout=120)
        session.upload(str(tmp_path / "k.so"))
        module = session.load_module("k.so")
        x = np.random.default_rng(0).standard_normal((3, 64)).astype("float32") + 3
        dev = session.cpu(0)
        mean, rstd = tvm.runtime.tensor(np.zeros(3, "float32"), dev), tvm.runtime.tensor(np.zeros(3, "float32"), dev)
        module[kernel.name](tvm.runtime.tensor(x, dev), 1e-5, mean, rstd)
        np.testing.assert_allclose(mean.numpy(), x.mean(axis=1), rtol=1e-5)
    assert rpc.measurements_per_server(tmp_path / "rpc") == [1]


def test_local_rpc_without_tornado_says_what_to_install(tmp_path, monkeypatch):
    """TVM's tracker imports tornado; without it the tracker process dies at once, so say so first."""
    import importlib.util

    from schedules import rpc

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tornado" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install tornado"), rpc.local_rpc(1, "k", tmp_path):
        pass
    assert not (tmp_path / "rpc_tracker.log").exists()
