"""The lntune command line: thin wrappers that parse arguments, call the library, and print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _words(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def cmd_targets(args) -> int:
    from schedules.targets import TARGETS

    for t in TARGETS.values():
        print(f"{t.name:<12} {t.family:<5} {t.notes}")
    return 0


def cmd_export(args) -> int:
    from lntune.build import export

    export(args.target, args.hidden, args.dtype, args.output, logs_dir=args.tuning_logs)
    return 0


def cmd_check(args) -> int:
    from lntune.check import check_library, format_table
    from lntune.runner import load

    lib = load(args.library)
    rows = check_library(lib, args.rows, seed=args.seed)
    print(f"{lib.manifest['target']} library {args.library} on {lib.device}:")
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_tune(args) -> int:
    import logging

    from lntune.build import kernels_for
    from schedules import rpc
    from schedules.database import TUNING_LOGS
    from schedules.targets import get_target
    from schedules.tune import EVALUATOR, summarize, tune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    target = get_target(args.target)
    kernels = [k for n in args.hidden for d in args.dtype for k in kernels_for(n, d, target) if k.op in args.ops]
    log_dir = Path(args.log_dir or TUNING_LOGS / target.name)
    options = dict(log_dir=log_dir, workers=args.workers, builder_timeout=args.builder_timeout)
    gpus = _local_gpus(args.local_gpus) if args.local_gpus else None
    servers = len(gpus) if gpus else args.local_servers
    if servers:
        with rpc.local_rpc(servers, args.rpc_key, log_dir / "rpc", gpus) as tracker:
            tune(
                kernels,
                target,
                args.trials,
                runner=rpc.rpc_runner(tracker, args.rpc_key, EVALUATOR, servers),
                **options,
            )
        print(f"measurements per RPC server: {rpc.measurements_per_server(log_dir / 'rpc')}")
    elif args.rpc_tracker:
        runner = rpc.rpc_runner(args.rpc_tracker, args.rpc_key, EVALUATOR, args.rpc_workers)
        tune(kernels, target, args.trials, runner=runner, **options)
    else:
        tune(kernels, target, args.trials, **options)
    print(summarize(kernels, target, log_dir))
    return 0


def cmd_prune(args) -> int:
    from lntune.build import kernels_for
    from schedules import spaces
    from schedules.database import TUNING_LOGS, workload_hash
    from schedules.targets import get_target
    from schedules.tune import exclusive, prune
    from te_ops.layer_norm import GRANULES

    target = get_target(args.target)
    # Records at the rule's P and the default granule stay too: a kernel at a selected P or granule
    # takes its knobs from them.
    live = {
        workload_hash(k, target)
        for n in args.hidden
        for d in args.dtype
        for p in (None, spaces.parts_for(target, n, d))
        for g in GRANULES
        for k in kernels_for(n, d, target, p, g)
    }
    log_dir = Path(args.log_dir or TUNING_LOGS / target.name)
    with exclusive(log_dir):
        before, after = prune(log_dir, args.keep, live)
    print(f"{log_dir}: {before} records -> {after} (the {args.keep} best per kernel of the given set)")
    return 0


def _local_gpus(text: str) -> list[int]:
    """GPU indices from "all" (every GPU nvidia-smi or rocm-smi lists) or "0,1,..."."""
    import subprocess

    if text != "all":
        return _ints(text)
    for command in (["nvidia-smi", "-L"], ["rocm-smi", "--showid"]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        count = sum(line.startswith("GPU") for line in out.splitlines())
        if count:
            return list(range(count))
    raise ValueError("--local-gpus all: no GPU found (nvidia-smi and rocm-smi list none)")


def cmd_select(args) -> int:
    from lntune.select import select, select_parts

    if args.parts:
        path = select_parts(args.target, args.hidden, args.dtype, args.elements)
    else:
        path = select(args.target, args.hidden, args.dtype, args.elements, args.ops, args.focus)
    print(f"wrote {path}", flush=True)
    return 0


def cmd_bench(args) -> int:
    from lntune.bench import main as bench_main

    return bench_main(args)


def cmd_inspect(args) -> int:
    from lntune.inspect import inspect_library

    print(inspect_library(Path(args.library)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lntune", description="Tuned LayerNorm kernels from TVM TensorExpression.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("targets", help="list the registered targets").set_defaults(func=cmd_targets)

    e = sub.add_parser("export", help="compile variants into DIR/lntune.so + DIR/manifest.json")
    e.add_argument("--target", default="llvm")
    e.add_argument("--hidden", type=_ints, required=True, help="comma-separated hidden sizes, e.g. 768,1024")
    e.add_argument("--dtype", type=_words, default=["float32"], help="comma-separated: float32,float16,bfloat16")
    e.add_argument("-o", "--output", required=True, help="output directory")
    e.add_argument("--tuning-logs", type=Path, default=None, help="tuning_logs root (default: the repo's)")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("check", help="run every kernel of a library against the float64 reference")
    c.add_argument("library", help="export directory or its lntune.so")
    c.add_argument("--rows", type=_ints, default=[1, 37, 1000], help="row counts M to test")
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(func=cmd_check)

    t = sub.add_parser("tune", help="tune kernels with MetaSchedule on this machine's device")
    t.add_argument("--target", required=True)
    t.add_argument("--hidden", type=_ints, required=True)
    t.add_argument("--dtype", type=_words, default=["float32"])
    t.add_argument("--ops", type=_words, default=["forward", "forward_stats", "backward", "backward_sum"])
    t.add_argument("--trials", type=int, default=32, help="measured trials per kernel")
    t.add_argument("--log-dir", type=Path, default=None, help="database folder (default tuning_logs/<target>)")
    t.add_argument("--workers", type=int, default=None, help="builder processes (default: all cores)")
    t.add_argument("--builder-timeout", type=float, default=120.0, help="seconds per candidate build")
    t.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker to measure through")
    t.add_argument("--rpc-key", default="lntune", help="device key the RPC servers registered with")
    t.add_argument("--rpc-workers", type=int, default=1, help="concurrent RPC measurements (servers to use)")
    t.add_argument("--local-gpus", default=None, help="'all' or 0,1,...: start a tracker and a server per GPU")
    t.add_argument("--local-servers", type=int, default=0, help="start a tracker and N local servers (CPU)")
    t.set_defaults(func=cmd_tune)

    r = sub.add_parser("prune", help="keep the best records of the given kernels' current workloads only")
    r.add_argument("--target", required=True)
    r.add_argument("--hidden", type=_ints, required=True)
    r.add_argument("--dtype", type=_words, default=["float32", "float16", "bfloat16"])
    r.add_argument("--keep", type=int, default=3, help="records kept per workload")
    r.add_argument("--log-dir", type=Path, default=None, help="database folder (default tuning_logs/<target>)")
    r.set_defaults(func=cmd_prune)

    s = sub.add_parser(
        "select", help="time baseline, tuned and structural variants as exported; keep the fastest per kernel"
    )
    s.add_argument("--target", required=True)
    s.add_argument("--hidden", type=_ints, required=True)
    s.add_argument("--dtype", type=_words, default=["float32"])
    s.add_argument("--elements", type=int, default=1 << 26, help="M*N at which kernels are timed")
    s.add_argument("--ops", type=_words, default=None, help="only these ops (default: all four)")
    s.add_argument(
        "--focus",
        default=None,
        help="KNOB or KNOB=VALUE, or several joined by commas: time only the baseline, today's selection "
        "and the variants that set them",
    )
    s.add_argument(
        "--parts", action="store_true", help="choose P (backward row chunks) per hidden size and dtype instead"
    )
    s.set_defaults(func=cmd_select)

    b = sub.add_parser("bench", help="GPU benchmark against ATen, torch.compile and Liger")
    b.add_argument("library", help="export directory of the library to benchmark")
    b.add_argument("--elements", type=_ints, default=[1 << 26], help="M*N per shape")
    b.add_argument("--rows", type=_ints, default=None, help="row counts M instead of --elements")
    b.add_argument("--hidden", type=_ints, default=None, help="only these hidden sizes of the library")
    b.add_argument("--dtype", type=_words, default=None, help="only these dtypes of the library")
    b.add_argument("--tag", default="", help="suffix for the result file names")
    b.add_argument("--out", type=Path, default=Path("bench/results"))
    b.add_argument("--peers", type=_words, default=["api", "aten", "compile", "liger"])
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="per-kernel facts of a library (registers, spills, vector loads)")
    i.add_argument("library")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"lntune {args.command}: error: {err}", file=sys.stderr)
        return 2
