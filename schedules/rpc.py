"""Measuring through TVM's RPC tracker: a runner for a tracker address, and local tracker + servers.

`lntune tune --rpc-tracker HOST:PORT --rpc-key KEY` sends candidates to whatever servers registered
with that key (one per GPU, on any machines); the builder stays local. `--local-servers N` (CPU) or
`--local-gpus all|0,1,...` starts a tracker and N servers here, each server pinned to one GPU, so one
tuning job spreads its measurements over all of them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tvm.s_tir import meta_schedule as ms

LOOPBACK = "127.0.0.1"


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--rpc-tracker must be HOST:PORT, got {address!r}")
    return host, int(port)


def rpc_runner(tracker: str, key: str, evaluator: ms.runner.EvaluatorConfig, workers: int) -> ms.runner.RPCRunner:
    host, port = parse_address(tracker)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=300)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=workers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _wait(predicate, seconds: float, what: str, processes=()) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"an RPC process exited while waiting for {what}; see its log")
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {seconds:.0f} s waiting for {what}")


def _free_servers(host: str, port: int, key: str) -> int:
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except (ConnectionError, OSError, RuntimeError):
        return 0
    return sum(1 for info in summary.get("server_info", []) if info.get("key", "").split(":")[-1] == key)


@contextlib.contextmanager
def local_rpc(
    count: int, key: str, log_dir: Path, gpus: list[int] | None = None, forked_sessions: bool | None = None
) -> Iterator[str]:
    """A tracker and `count` RPC servers on loopback (server i pinned to gpus[i]); yields HOST:PORT.

    Sessions are forked on the CPU and spawned for GPUs unless `forked_sessions` says (server_command).
    Each server logs to log_dir/rpc_server_<i>.log, where "load_module" lines count its measurements.
    """
    forked_sessions = gpus is None if forked_sessions is None else forked_sessions
    if importlib.util.find_spec("tornado") is None:
        raise RuntimeError("TVM's RPC tracker needs the tornado package, which is not installed: pip install tornado")
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    processes = []
    try:
        tracker_log = (log_dir / "rpc_tracker.log").open("w")
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tvm.exec.rpc_tracker",
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(port),
                    "--port-end",
                    str(port + 1),
                ],
                stdout=tracker_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        _wait(lambda: _connects(port), 60, f"the RPC tracker on port {port}", processes)
        for i in range(count):
            env = dict(os.environ)
            if gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(gpus[i])
            log = (log_dir / f"rpc_server_{i}.log").open("w")
            command = server_command(_free_port(), port, key, forked_sessions)
            # A session of its own: the server's session workers are ended with it (its group).
            processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            )
        _wait(
            lambda: _free_servers(LOOPBACK, port, key) >= count, 120, f"{count} RPC servers with key {key!r}", processes
        )
        yield f"{LOOPBACK}:{port}"
    finally:
        _end_groups(processes)


def _end_groups(processes: list[subprocess.Popen]) -> None:
    """Terminate each process's group (the process and whatever it started), then kill what stays."""
    for process in reversed(processes):
        _signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process, signal.SIGKILL)  # workers that outlived their server
        process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def server_command(port: int, tracker_port: int, key: str, forked_sessions: bool) -> list[str]:
    """The command line of one RPC server on loopback that registers with the tracker.

    A TVM RPC server serves each session in a child process, forked by default. A GPU server must
    not fork: the server process has loaded the CUDA driver (libtvm links it), and a forked child
    then fails its first CUDA call (CUDA_ERROR_NOT_INITIALIZED, every trial of a tuning job on the
    H200 host, 2026-11-26). `--no-fork` spawns a fresh interpreter per session instead (~4 s there,
    mostly importing TVM), so GPU measurements cost that much more each; CPU servers keep forking.
    """
    command = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", LOOPBACK, "--port", str(port)]
    command += ["--port-end", str(port + 1), "--tracker", f"{LOOPBACK}:{tracker_port}", "--key", key]
    return command if forked_sessions else [*command, "--no-fork"]


def _connects(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def measurements_per_server(log_dir: Path) -> list[int]:
    """How many modules each local server loaded (one per measured candidate)."""
    logs = sorted(log_dir.glob("rpc_server_*.log"))
    return [path.read_text().count("load_module") for path in logs]
