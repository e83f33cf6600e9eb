"""The tuning driver end to end on the CPU: MetaSchedule measures our design space, writes and prunes
its database, resumes from it, and export then uses the tuned record."""

import json

import numpy as np
import pytest

from lntune.build import export, kernel_library
from schedules import database
from schedules.targets import get_target
from schedules.tune import prune, summarize, tune
from te_ops.layer_norm import Kernel


def test_tune_writes_records_that_export_uses(tmp_path):
    target = get_target("llvm")
    kernel = Kernel("forward_stats", 64, "float32")
    log_dir = tmp_path / "llvm"
    tune([kernel], target, 2, log_dir=log_dir, workers=1, seed=1)
    records = database.read_records(log_dir)
    assert database.workload_hash(kernel, target) in records
    first = (log_dir / database.RECORDS).read_text().count("\n")
    tune([kernel], target, 2, log_dir=log_dir, workers=1, seed=2)  # resumes: earlier records stay
    assert (log_dir / database.RECORDS).read_text().count("\n") >= first
    assert "forward_stats" in summarize([kernel], target, log_dir)
    manifest = export("llvm", [64], ["float32"], tmp_path / "lib", logs_dir=tmp_path, log=lambda *_: None)
    sources = {v["op"]: v["schedule"] for v in manifest["variants"]}
    assert sources["forward_stats"].startswith("tuned:")
    assert sources["forward"] == "baseline"


def test_prune_keeps_the_fastest_records(tmp_path):
    lines = [json.dumps([0, [[[], []], [s], {}, []]]) for s in (3e-4, 1e-4, 1e10, 2e-4, 5e-4)]
    (tmp_path / database.WORKLOADS).write_text(json.dumps(["123", "w"]) + "\n")
    (tmp_path / database.RECORDS).write_text("\n".join(lines) + "\n")
    assert prune(tmp_path, keep=2) == (5, 2)
    kept = [json.loads(line)[1][1][0] for line in (tmp_path / database.RECORDS).read_text().splitlines()]
    assert kept == [1e-4, 2e-4]
    assert prune(tmp_path, keep=2, live={"123"}) == (2, 2)
    assert prune(tmp_path, keep=2, live={"456"}) == (2, 0)  # a workload no current kernel has
    assert (tmp_path / database.WORKLOADS).read_text() == ""


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

    target = get_target("llvm")
    kernel = Kernel("forward_stats", 64, "float32")
    record = [[[], []], [1e-4], {}, []]
    workloads = [[database.workload_hash(kernel, target), "w"], ["999", "stale"]]
    (tmp_path / database.WORKLOADS).write_text("".join(json.dumps(w) + "\n" for w in workloads))
    (tmp_path / database.RECORDS).write_text(json.dumps([0, record]) + "\n" + json.dumps([1, record]) + "\n")
    assert main(["prune", "--target", "llvm", "--hidden", "64", "--dtype", "float32", "--log-dir", str(tmp_path)]) == 0
    assert "2 records -> 1" in capsys.readouterr().out
    assert json.loads((tmp_path / database.WORKLOADS).read_text())[0] == workloads[0][0]


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
