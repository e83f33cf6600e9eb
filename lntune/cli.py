"""The lntune command line: thin wrappers that parse arguments, call the library, and print.

Every argument is checked before any work: a bad one ends the command with one line on stderr
(`lntune CMD: error: ...`) and exit status 2. So does a failure of the command itself that is the
user's to fix (a missing or damaged export, a bad path); never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lntune import files

PEERS = ("api", "aten", "compile", "liger")
# Plain dtypes (tuning, selection, pruning) and the specs export accepts: "ACTIVATIONS:PARAMETERS"
# for float32 gamma/beta beside 16-bit rows (te_ops.layer_norm.DTYPE_SPECS; a test keeps them equal).
DTYPES = files.DTYPES
DTYPE_SPECS = DTYPES + ("float16:float32", "bfloat16:float32")
STEP_CONFIGS = ("bf16", "fp32", "bf16-fp32params", "fp16", "fp16-fp32params")  # lntune.step_bench.CONFIGS


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block): `lntune CMD: error: ...`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# -- argument types: each raises ArgumentTypeError naming what it expected ---------------------------


def _list(text: str, what: str) -> list[str]:
    items = [v.strip() for v in text.split(",")]
    if not text.strip() or any(not v for v in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
    return items


def _positive_ints(text: str) -> list[int]:
    what = "positive integers"
    try:
        values = [int(v) for v in _list(text, what)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
    return values


def _indices(text: str) -> list[int]:
    try:
        values = [int(v) for v in _list(text, "GPU indices")]
    except ValueError:
        values = [-1]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated GPU indices (0, 1, ...), got {text!r}")
    return values


def _words(text: str) -> list[str]:
    return list(dict.fromkeys(_list(text, "names")))


def _int_at_least(least: int, what: str):
    """An argparse type: an integer >= least, else an error saying `what` was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "an integer >= 0")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _path(text: str) -> Path:
    """A path with `~` expanded; never empty (an empty path would mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return Path(os.path.expanduser(text))


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in _list(text, "ROWSxN shapes"):
        rows, _, hidden = item.lower().partition("x")
        try:
            shape = (int(rows), int(hidden))
        except ValueError:
            shape = (0, 0)
        if min(shape) < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated ROWSxN shapes like 2048x768, got {item!r}")
        shapes.append(shape)
    return shapes


# -- checks that need the registry or the file system, made after parsing, before any work ----------


def _check_choices(values: list[str] | None, allowed: tuple[str, ...], option: str) -> None:
    bad = [v for v in values or [] if v not in allowed]
    if bad:
        raise ValueError(f"{option}: unknown {', '.join(map(repr, bad))}; expected some of {', '.join(allowed)}")


def _check_target(name: str) -> None:
    from schedules.targets import get_target

    get_target(name)  # ValueError: "target must be one of [...], got 'x'"


def _check_folder(path: Path | None, option: str) -> None:
    if path is not None and not path.is_dir():
        raise ValueError(f"{option}: {path} is not a folder")


def validate(args: argparse.Namespace) -> None:
    """The checks argparse's types cannot make alone; ValueError naming the argument."""
    command = args.command
    if getattr(args, "target", None) is not None:
        _check_target(args.target)
    if command == "export":
        _check_choices(args.dtype, DTYPE_SPECS, "--dtype")
        args.output = files.output_directory(args.output)
        _check_folder(args.tuning_logs, "--tuning-logs")
    elif command in ("tune", "select", "prune"):
        _check_choices(args.dtype, DTYPES, "--dtype")
        _check_choices(getattr(args, "ops", None), files.OPS, "--ops")
    if command == "prune":
        _check_folder(args.log_dir, "--log-dir")
    if command == "bench":
        _check_bench(args)


def _check_bench(args: argparse.Namespace) -> None:
    _check_choices(args.dtype, DTYPE_SPECS, "--dtype")
    _check_choices(args.peers, PEERS, "--peers")
    _check_choices(args.configs, STEP_CONFIGS, "--configs")
    if args.library is None and not args.step:
        raise ValueError("the library (an export folder) is required, except with --step")
    if args.library is not None and not args.library.is_dir():
        raise ValueError(f"library: {args.library} is not a folder (an lntune export)")


# -- commands ---------------------------------------------------------------------------------------


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

    directory = files.library_directory(args.library)
    files.read_manifest(directory)  # a damaged export stops here, before dlopen
    lib = load(directory)
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
    from schedules import database, rules
    from schedules.targets import get_target
    from schedules.tune import exclusive, prune
    from te_ops.layer_norm import GRANULES

    target = get_target(args.target)
    # Records at the rule's P and the default granule stay too: a kernel at a selected P or granule
    # takes its knobs from them; so do those of a kernel's earlier workload (workload_hashes).
    live = {
        h
        for n in args.hidden
        for d in args.dtype
        for p in (None, rules.parts_for(target, n, d))
        for g in GRANULES
        for k in kernels_for(n, d, target, p, g)
        for h in database.workload_hashes(k, target)
    }
    log_dir = Path(args.log_dir or database.TUNING_LOGS / target.name)
    with exclusive(log_dir):
        before, after = prune(log_dir, args.keep, live)
    print(f"{log_dir}: {before} records -> {after} (the {args.keep} best per kernel of the given set)")
    return 0


def _local_gpus(spec: str | list[int]) -> list[int]:
    """GPU indices from "all" (every GPU nvidia-smi or rocm-smi lists) or a list of them."""
    import subprocess

    if spec != "all":
        return list(spec)
    for command in (["nvidia-smi", "-L"], ["rocm-smi", "--showid"]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        count = sum(line.startswith("GPU") for line in out.splitlines())
        if count:
            return list(range(count))
    raise ValueError("--local-gpus all: no GPU found (nvidia-smi and rocm-smi list none)")


def _gpus(text: str) -> str | list[int]:
    return "all" if text.strip() == "all" else _indices(text)


def cmd_select(args) -> int:
    from lntune.select import select, select_parts

    if args.parts:
        path = select_parts(args.target, args.hidden, args.dtype, args.elements)
    else:
        path = select(args.target, args.hidden, args.dtype, args.elements, args.ops, args.focus)
    print(f"wrote {path}", flush=True)
    return 0


def cmd_bench(args) -> int:
    if args.step:
        from lntune import step_bench

        path = step_bench.run(
            library=args.library, shapes=args.shapes, configs=args.configs, out=args.out, tag=args.tag
        )
        print(f"wrote {path}", flush=True)
        return 0
    from lntune.bench import main as bench_main

    return bench_main(args)


def cmd_inspect(args) -> int:
    from lntune.inspect import inspect_library

    print(inspect_library(args.library))
    return 0


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="lntune", description="Tuned LayerNorm kernels from TVM TensorExpression.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("targets", help="list the registered targets").set_defaults(func=cmd_targets)

    e = sub.add_parser("export", help="compile variants into DIR/lntune.so + DIR/manifest.json")
    e.add_argument("--target", default="llvm")
    e.add_argument("--hidden", type=_positive_ints, required=True, help="comma-separated hidden sizes, e.g. 768,1024")
    e.add_argument(
        "--dtype",
        type=_words,
        default=["float32"],
        help="comma-separated: float32, float16, bfloat16, or bfloat16:float32 / float16:float32 "
        "(16-bit activations, float32 gamma and beta)",
    )
    e.add_argument("-o", "--output", type=_path, required=True, help="output folder (replaced whole, atomically)")
    e.add_argument("--tuning-logs", type=_path, default=None, help="tuning_logs root (default: the repo's)")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("check", help="run every kernel of a library against the float64 reference")
    c.add_argument("library", type=_path, help="export directory or its lntune.so")
    c.add_argument("--rows", type=_positive_ints, default=[1, 37, 1000], help="row counts M to test")
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(func=cmd_check)

    t = sub.add_parser("tune", help="tune kernels with MetaSchedule on this machine's device")
    t.add_argument("--target", required=True)
    t.add_argument("--hidden", type=_positive_ints, required=True)
    t.add_argument("--dtype", type=_words, default=["float32"])
    t.add_argument("--ops", type=_words, default=list(files.OPS))
    t.add_argument("--trials", type=_positive_int, default=32, help="measured trials per kernel")
    t.add_argument("--log-dir", type=_path, default=None, help="database folder (default tuning_logs/<target>)")
    t.add_argument("--workers", type=_positive_int, default=None, help="builder processes (default: all cores)")
    t.add_argument("--builder-timeout", type=_seconds, default=120.0, help="seconds per candidate build")
    t.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker to measure through")
    t.add_argument("--rpc-key", default="lntune", help="device key the RPC servers registered with")
    t.add_argument("--rpc-workers", type=_positive_int, default=1, help="concurrent RPC measurements")
    t.add_argument("--local-gpus", type=_gpus, default=None, help="'all' or 0,1,...: a tracker and a server per GPU")
    t.add_argument("--local-servers", type=_count, default=0, help="start a tracker and N local servers (CPU)")
    t.set_defaults(func=cmd_tune)

    r = sub.add_parser("prune", help="keep the best records of the given kernels' current workloads only")
    r.add_argument("--target", required=True)
    r.add_argument("--hidden", type=_positive_ints, required=True)
    r.add_argument("--dtype", type=_words, default=list(DTYPES))
    r.add_argument("--keep", type=_positive_int, default=3, help="records kept per workload")
    r.add_argument("--log-dir", type=_path, default=None, help="database folder (default tuning_logs/<target>)")
    r.set_defaults(func=cmd_prune)

    s = sub.add_parser(
        "select", help="time baseline, tuned and structural variants as exported; keep the fastest per kernel"
    )
    s.add_argument("--target", required=True)
    s.add_argument("--hidden", type=_positive_ints, required=True)
    s.add_argument("--dtype", type=_words, default=["float32"])
    s.add_argument("--elements", type=_positive_int, default=1 << 26, help="M*N at which kernels are timed")
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
    b.add_argument("library", type=_path, nargs="?", default=None, help="export folder (optional with --step)")
    b.add_argument("--elements", type=_positive_ints, default=[1 << 26], help="M*N per shape")
    b.add_argument("--rows", type=_positive_ints, default=None, help="row counts M instead of --elements")
    b.add_argument("--hidden", type=_positive_ints, default=None, help="only these hidden sizes of the library")
    b.add_argument("--dtype", type=_words, default=None, help="only these dtypes of the library")
    b.add_argument("--tag", default="", help="suffix for the result file names")
    b.add_argument("--out", type=_path, default=Path("bench/results"))
    b.add_argument("--peers", type=_words, default=list(PEERS))
    b.add_argument("--step", action="store_true", help="time whole training steps (lntune.step_bench) instead")
    b.add_argument("--shapes", type=_shapes, default=None, help="--step: ROWSxN list, e.g. 2048x768,4096x1024")
    b.add_argument(
        "--configs",
        type=_words,
        default=["bf16", "fp32", "bf16-fp32params"],
        help=f"--step: dtype configurations, some of {','.join(STEP_CONFIGS)}",
    )
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="per-kernel facts of a library (registers, spills, vector loads)")
    i.add_argument("library", type=_path, help="export directory or its lntune.so")
    i.set_defaults(func=cmd_inspect)
    return p


def _one_line(err: BaseException) -> str:
    """An error's message on one line: TVM's may append a C++ backtrace; its last line is the error."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    return lines[-1].strip() if any("Traceback" in line for line in lines) else " ".join(lines)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush into a closed pipe is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as stop:  # argparse's one-line error (2) or --help (0)
        return stop.code if isinstance(stop.code, int) else 0
    try:
        validate(args)
    except (ValueError, OSError) as err:
        print(f"lntune {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader left (`lntune inspect DIR | head`): not an error of ours
        _quiet_stdout()
        return 0
    except (ValueError, TypeError, OSError, RuntimeError) as err:  # files.LibraryError is a ValueError
        print(f"lntune {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
