"""One tuning job measured on 1, 2, ... GPUs of this host through lntune's local RPC tracker.

    python3 bench/scale_tune.py OUT_DIR HIDDEN DTYPES OPS TRIALS GPU_SETS...
    e.g. python3 bench/scale_tune.py $OUT 4096 bfloat16 backward,forward 128 0 0,1 0,1,2,3

Each GPU set tunes the same kernels from an empty database (`lntune tune --local-gpus SET`, builders
on every core), one after another so they do not share the CPUs. Reports wall time, trials measured
(per RPC server, from the servers' logs), trials per minute and each kernel's best measured time,
to OUT_DIR/scale-tune.md and .json. TARGET=llvm runs it on the CPU with that many loopback servers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TARGET = os.environ.get("TARGET", "cuda-sm90")


def run(out: Path, hidden: str, dtypes: str, ops: str, trials: int, gpus: str) -> dict:
    from lntune.build import kernels_for
    from schedules import rpc
    from schedules.database import read_records, workload_hash
    from schedules.targets import get_target

    log_dir = Path("/tmp/lntune-scale") / f"gpus-{gpus.replace(',', '_')}"
    shutil.rmtree(log_dir, ignore_errors=True)
    command = [sys.executable, "-m", "lntune", "tune", "--target", TARGET, "--hidden", hidden]
    command += ["--dtype", dtypes, "--ops", ops, "--trials", str(trials), "--log-dir", str(log_dir)]
    # On the CPU (a dry run of this script) the "GPUs" are that many loopback servers.
    servers = ["--local-servers", str(len(gpus.split(",")))] if TARGET == "llvm" else ["--local-gpus", gpus]
    command += servers + ["--builder-timeout", "120"]
    start = time.monotonic()
    with (out / f"scale-tune-{gpus.replace(',', '_')}.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - start
    target = get_target(TARGET)
    records = read_records(log_dir)
    kernels = [
        k
        for n in hidden.split(",")
        for d in dtypes.split(",")
        for k in kernels_for(int(n), d, target)
        if k.op in ops.split(",")
    ]
    best = {k.name: round(records[h].seconds * 1e6, 1) for k in kernels if (h := workload_hash(k, target)) in records}
    per_server = rpc.measurements_per_server(log_dir / "rpc")
    return {
        "gpus": gpus,
        "returncode": done.returncode,
        "wall_s": round(wall, 1),
        "measured": sum(per_server),
        "per_server": per_server,
        "trials_per_min": round(sum(per_server) / wall * 60, 1),
        "best_us": best,
    }


def main() -> None:
    out, hidden, dtypes, ops, trials, *gpu_sets = sys.argv[1:]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for gpus in gpu_sets:
        results.append(run(out, hidden, dtypes, ops, int(trials), gpus))
        print(json.dumps(results[-1]), flush=True)
    (out / "scale-tune.json").write_text(json.dumps(results, indent=1) + "\n")
    smi = ["nvidia-smi", "-L"] if shutil.which("nvidia-smi") else ["true"]
    device = subprocess.run(smi, capture_output=True, text=True, check=False).stdout.strip()
    lines = [
        f"# Tuning on several GPUs: N={hidden} {dtypes} {ops}, {trials} trials a kernel",
        "",
        f"{time.strftime('%Y-%m-%d')}, {device.splitlines()[0] if device else '?'} ({len(device.splitlines())} GPUs)",
        "",
        "| GPUs | wall s | measured | per server | trials/min | speed-up | best us |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speedup = r["trials_per_min"] / results[0]["trials_per_min"] if results[0]["trials_per_min"] else 0
        best = ", ".join(f"{name.removeprefix('lntune_')} {us}" for name, us in r["best_us"].items())
        lines.append(
            f"| {r['gpus']} | {r['wall_s']} | {r['measured']} | {r['per_server']} | {r['trials_per_min']} "
            f"| {speedup:.2f} | {best} |"
        )
    (out / "scale-tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
