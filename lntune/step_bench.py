"""`lntune bench --step`: one LayerNorm module's training step (forward + `.backward(dy)`), through the public API.

Users judge lntune by whether swapping `torch.nn.LayerNorm` for `lntune.torch.LayerNorm` makes their step faster,
so this times modules, not kernels: per shape M×N and config, torch eager, torch.compile, Liger-Kernel, lntune
eager and lntune compiled run the same step on the same inputs, in one run, on one device. Each step sets the
gradients to None (as `optimizer.zero_grad()` does), calls the module and back-propagates dy: autograd, the
module's Python, argument checks and allocations are all in the step (`lntune bench` times bare kernels).

Every implementation's y, dx, dweight and dbias are checked against a float64 reference before it is timed; a
wrong lntune raises (a fast wrong kernel must not get a number), a wrong or failing peer is recorded as missing
with the reason. Step time (the device's): CUDA events around batches of `steps` back-to-back steps, queued while
a spin kernel holds the device (`Clock`), so that at small shapes it is not the host's launch rate; the median
batch of a round, the least of ROUNDS rounds taken in turn over the implementations (a slow spell of the host
or device spoils one round, not a result); on a CPU, wall time. Host time: wall time of many steps issued
without synchronising, over their count, which on a GPU is the CPU's cost of issuing a step unless the device
is the slower of the two (then it is bounded by the device, and marked so).
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from lntune import files
from lntune.timing import ROUNDS, least_of_rounds
from te_ops import reference

EPS = 1e-5
IMPLEMENTATIONS = ("torch", "torch-compile", "liger", "lntune", "lntune-compile")
PEERS = ("torch", "torch-compile", "liger")  # lntune's speed-up is over the fastest of these
CONFIGS = {  # name -> (x and dy dtype, parameter dtype)
    "bf16": ("bfloat16", "bfloat16"),
    "fp32": ("float32", "float32"),
    "bf16-fp32params": ("bfloat16", "float32"),  # AMP / FSDP master weights
    "fp16": ("float16", "float16"),
    "fp16-fp32params": ("float16", "float32"),
}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_CONFIGS = ("bf16", "fp32", "bf16-fp32params")
DEFAULT_SHAPES = ((2048, 768), (4096, 1024), (8192, 2048), (8192, 4096), (16384, 8192), (4096, 16384))
BATCHES, WARMUP = 5, 2
HOST_STEPS = 200
HOST_BOUND = 0.9  # device step time at least this fraction of the host time: the device may have set the pace
DEFAULT_L2_BYTES = 50 * 2**20  # H100; used where the device does not report its L2
FIELDS = [
    "device", "date", "torch", "config", "x_dtype", "param_dtype", "rows", "hidden", "impl",
    "step_us", "step_unqueued", "host_us", "host_bounded", "vs_torch", "over_best_peer",
    "bytes", "gbps", "fraction_of_copy", "x_in_l2", "err_y", "err_dx", "err_dweight", "err_dbias", "missing",
]  # fmt: skip


class WrongResult(RuntimeError):
    """An lntune implementation's step disagrees with the float64 reference."""


# ---------------------------------------------------------------- validation


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_arguments(shapes, configs, steps, host_steps, implementations, tag) -> None:
    """Raise before anything runs or is written: bad input names the argument and what was expected."""
    pairs = isinstance(shapes, (list, tuple)) and all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(_positive_int(v) for v in s) for s in shapes
    )
    if not pairs or not shapes:
        raise ValueError(f"shapes must be a non-empty list of (rows, hidden) pairs of positive ints, got {shapes!r}")
    if not isinstance(configs, (list, tuple)) or not configs or any(c not in CONFIGS for c in configs):
        raise ValueError(f"configs must be a non-empty list of names from {list(CONFIGS)}, got {configs!r}")
    for name, value in (("steps", steps), ("host_steps", host_steps)):
        if not _positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    known = isinstance(implementations, (list, tuple)) and all(i in IMPLEMENTATIONS for i in implementations)
    if not known or "torch" not in implementations:
        raise ValueError(
            f"implementations must be a list of names from {list(IMPLEMENTATIONS)} including 'torch' (the "
            f"baseline of every ratio), got {implementations!r}"
        )
    if not isinstance(tag, str) or not re.fullmatch(r"[\w.+-]*", tag):
        raise ValueError(f"tag must be letters, digits and . _ + - only (it names files), got {tag!r}")


# ---------------------------------------------------------------- timing


class Clock:
    """Step and copy timing on one device: CUDA events on a GPU, time.perf_counter on a CPU.

    On a GPU, each timed batch is queued behind a spin kernel (torch.cuda._sleep) that holds the device until
    the host has issued the whole batch, so the events measure the steps back to back on the device alone:
    at small shapes a step's host cost (launches, autograd, Python; 0.2-1.2 ms on the H100 host) exceeds its
    device time, and events around an unheld batch would time the host instead. The host's cost is measured
    on its own (`host_ms`). A step that waits for the device inside (a synchronisation) cannot be queued
    ahead; its batches are timed anyway and the step is listed in `unqueued`.
    """

    def __init__(self, torch, device: str):
        self.torch, self.device = torch, device
        self.lead_ms: dict[Callable, float] = {}  # per step: how long the device is held before its batch
        self.unqueued: set[Callable] = set()
        self._cycles_per_ms: float | None = None

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _hold(self, ms: float) -> None:
        """Keep the device busy for about `ms` (spin cycles calibrated once at this clock)."""
        torch = self.torch
        if self._cycles_per_ms is None:
            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            torch.cuda._sleep(1000)
            begin.record()
            torch.cuda._sleep(10**7)
            end.record()
            end.synchronize()
            self._cycles_per_ms = 10**7 / begin.elapsed_time(end)
        torch.cuda._sleep(int(ms * self._cycles_per_ms))

    def per_call_ms(self, fn: Callable[[], object], count: int) -> float:
        """Milliseconds per call of `count` calls queued back to back (events around the whole batch)."""
        if self.device != "cuda":
            start = time.perf_counter()
            for _ in range(count):
                fn()
            return (time.perf_counter() - start) * 1e3 / count
        begin, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        for _ in range(3):  # the hold grows until the host issues the batch well inside it
            lead = self.lead_ms.get(fn, 5.0)
            self._hold(lead)
            begin.record()
            start = time.perf_counter()
            for _ in range(count):
                fn()
            issue_ms = (time.perf_counter() - start) * 1e3
            end.record()
            end.synchronize()
            if issue_ms < 0.7 * lead:  # margin for a clock faster than the calibration's
                return begin.elapsed_time(end) / count
            self.lead_ms[fn] = 2 * issue_ms + 1.0
        self.unqueued.add(fn)
        return begin.elapsed_time(end) / count

    def median_ms(self, fn: Callable[[], object], count: int) -> float:
        """The median of BATCHES batches (per call), after WARMUP calls."""
        for _ in range(WARMUP):
            fn()
        self.sync()
        return statistics.median(self.per_call_ms(fn, count) for _ in range(BATCHES))

    def host_ms(self, fn: Callable[[], object], count: int) -> float:
        """Wall milliseconds per call of `count` calls issued without synchronising (the queue drained first)."""
        self.sync()
        start = time.perf_counter()
        for _ in range(count):
            fn()
        elapsed = time.perf_counter() - start
        self.sync()
        return elapsed * 1e3 / count


def copy_gbps(clock: Clock) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    torch = clock.torch
    # 1 GiB on a GPU, far past its L2; on a CPU (tests, laptops) 16 MiB, a few copies, to stay quick.
    nbytes, count = (1 << 30, 10) if clock.device == "cuda" else (1 << 24, 3)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=clock.device).uniform_()
    dst = torch.empty_like(src)
    ms = min(clock.median_ms(lambda: dst.copy_(src), count) for _ in range(ROUNDS))
    return 2 * nbytes / ms / 1e6


# ---------------------------------------------------------------- implementations


def _configure_compile(torch) -> None:
    """One process compiles every shape × config: keep dynamo from giving up (falling back to eager)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 1024)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 8192)


def _module(torch, name: str, hidden: int, library, device: str, param_dtype):
    """An uncompiled LayerNorm module of the implementation `name` (compiled ones wrap it)."""
    if name.startswith("torch"):
        return torch.nn.LayerNorm(hidden, EPS, device=device, dtype=param_dtype)
    if name == "liger":
        if device != "cuda":
            raise RuntimeError("Liger-Kernel needs a CUDA GPU (Triton)")
        try:
            from liger_kernel.transformers import LigerLayerNorm
        except ImportError as err:
            raise RuntimeError(f"liger_kernel is not importable ({err})") from None
        return LigerLayerNorm(hidden, eps=EPS, bias=True).to(device=device, dtype=param_dtype)
    import lntune.torch

    # library=None: lntune.torch finds or exports the variant itself (its per-user cache).
    where = {} if library is None else {"library": str(library)}
    return lntune.torch.LayerNorm(hidden, EPS, **where, device=device, dtype=param_dtype)


def _step(torch, name: str, inputs: dict, library) -> tuple[Callable[[], object], object]:
    """A training step of `name`'s module on the shared inputs; returns (step, module)."""
    x, dy = inputs["x"], inputs["dy"]
    module = _module(torch, name, x.shape[1], library, x.device.type, inputs["weight"].dtype)
    with torch.no_grad():  # the same random (never 1 and 0) parameters in every implementation
        module.weight.copy_(inputs["weight"])
        module.bias.copy_(inputs["bias"])
    call = module
    if name.endswith("-compile"):
        # dynamic=False: one kernel specialised per shape, as a model of fixed shapes gets; otherwise the
        # second shape would turn dynamic shapes on for every later one.
        call = torch.compile(module, dynamic=False, fullgraph=name == "lntune-compile")
    params = (module.weight, module.bias)

    def step():
        x.grad = None  # optimizer.zero_grad(set_to_none=True), and no grad accumulation into x
        for p in params:
            p.grad = None
        y = call(x)
        y.backward(dy)
        return y

    return step, module


def _inputs(torch, device: str, rows: int, hidden: int, config: str) -> dict:
    """Fresh random x (offset, so mean subtraction matters), dy, weight and bias for one cell."""
    x_dtype, param_dtype = (getattr(torch, d) for d in CONFIGS[config])
    gen = torch.Generator(device=device).manual_seed(rows * 100003 + hidden)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    return {
        "x": (randn(rows, hidden) + 3.0).to(x_dtype).requires_grad_(True),
        "dy": randn(rows, hidden).to(x_dtype),
        "weight": (1.0 + 0.5 * randn(hidden)).to(param_dtype),
        "bias": randn(hidden).to(param_dtype),
    }


# ---------------------------------------------------------------- correctness


def _reference(torch, inputs: dict) -> dict:
    """y and the three gradients in float64 (torch's kernels on the same values, upcast)."""
    x, w, b = (inputs[k].detach().double().requires_grad_(True) for k in ("x", "weight", "bias"))
    y = torch.nn.functional.layer_norm(x, (x.shape[1],), w, b, EPS)
    y.backward(inputs["dy"].double())
    return {"y": y.detach(), "dx": x.grad, "dweight": w.grad, "dbias": b.grad}


def _rel_error(torch, got, want, dtype) -> float:
    """||got - want|| / ||want|| in float64 on the device; inf when got is missing, mis-typed or not finite."""
    if got is None or got.dtype != dtype or got.shape != want.shape:
        return math.inf
    got = got.detach().double()
    if not bool(torch.isfinite(got).all()):
        return math.inf
    scale = float(want.norm())
    diff = float((got - want).norm())
    return diff / scale if scale > 0 else diff


def _errors(torch, step, module, inputs: dict, ref: dict) -> dict[str, float]:
    """Run one step from fresh gradients and measure each output against the reference."""
    y = step()
    x_dtype, p_dtype = inputs["x"].dtype, inputs["weight"].dtype
    got = {"y": y, "dx": inputs["x"].grad, "dweight": module.weight.grad, "dbias": module.bias.grad}
    want_dtype = {"y": x_dtype, "dx": x_dtype, "dweight": p_dtype, "dbias": p_dtype}
    return {k: _rel_error(torch, got[k], ref[k], want_dtype[k]) for k in got}


def _tolerance(config: str) -> float:
    """The bench's bound: twice the project tolerance of the config's activation dtype, for every output."""
    return 2 * reference.TOLERANCE[CONFIGS[config][0]]


# ---------------------------------------------------------------- one cell


def _prepare(torch, names, inputs, config, library, log) -> tuple[dict, dict, dict]:
    """Build and check each implementation: (steps that passed, their errors, missing name -> reason)."""
    ref = _reference(torch, inputs)
    limit = _tolerance(config)
    steps, errors, missing = {}, {}, {}
    rows, hidden = inputs["x"].shape
    for name in names:
        try:
            step, module = _step(torch, name, inputs, library)
            errs = _errors(torch, step, module, inputs, ref)  # also the first call: compiles
        except Exception as err:  # an implementation that cannot run this cell is a missing cell, not a crash
            missing[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
            log(f"  {name} {config} {rows}x{hidden}: missing ({missing[name]})")
            continue
        worst = max(errs.values())
        if not worst <= limit:
            detail = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
            message = f"{name} {config} {rows}x{hidden}: relative errors {detail} exceed {limit:.1e}"
            if name.startswith("lntune"):
                raise WrongResult(message)
            missing[name] = f"wrong result: {detail}"
            log(f"  {message}; not timed")
            continue
        steps[name], errors[name] = step, errs
    del ref
    return steps, errors, missing


def _digits(value: float, significant: int = 4) -> float:
    """Rounded to significant digits, not decimals: tiny CPU-test shapes reach only ~0.1 GB/s."""
    return float(f"{value:.{significant}g}")


def _cell_rows(meta, config, rows, hidden, names, timed: dict, missing: dict, copy: float, l2) -> list[dict]:
    """One CSV row per implementation; `timed`: name -> step and host ms, unqueued flag, errors."""
    x_size, p_size = (ITEMSIZE[d] for d in CONFIGS[config])
    # forward reads x, writes y; backward reads x and dy, writes dx; plus gamma, beta, dgamma, dbeta, dgamma's
    # read in backward (5 N) and mean/rstd written and read back (4 M float32 values).
    nbytes = 5 * rows * hidden * x_size + 5 * hidden * p_size + 16 * rows
    torch_ms = timed.get("torch", {}).get("step")
    best_peer = min((timed[p]["step"] for p in PEERS if p in timed), default=None)
    out = []
    for name in names:
        row = {**meta, "config": config, "x_dtype": CONFIGS[config][0], "param_dtype": CONFIGS[config][1]}
        row |= {"rows": rows, "hidden": hidden, "impl": name, "bytes": nbytes, "missing": missing.get(name, "")}
        row["x_in_l2"] = "" if l2 is None else rows * hidden * x_size < l2
        if name in timed:
            ms, host = timed[name]["step"], timed[name]["host"]
            gbps = nbytes / ms / 1e6
            row |= {"step_us": round(ms * 1e3, 2), "step_unqueued": timed[name]["unqueued"]}
            row |= {"host_us": round(host * 1e3, 2), "gbps": _digits(gbps), "fraction_of_copy": _digits(gbps / copy)}
            # The device as slow as the host or slower: the host may have waited on a full launch queue.
            row["host_bounded"] = meta["device_kind"] == "cuda" and ms >= HOST_BOUND * host
            row["vs_torch"] = round(torch_ms / ms, 3) if torch_ms else ""
            if name.startswith("lntune") and best_peer:
                row["over_best_peer"] = round(best_peer / ms, 3)
            row |= {f"err_{k}": f"{v:.2e}" for k, v in timed[name]["errors"].items()}
        out.append(row)
    return out


def measure_cell(torch, clock, meta, rows, hidden, config, names, library, steps, host_steps, copy, l2, log):
    """Check, then time, every implementation on one shape and config; the cell's CSV rows."""
    torch._dynamo.reset()  # a clean compile cache per cell: no guard walks over other shapes' graphs
    inputs = _inputs(torch, clock.device, rows, hidden, config)
    ready, errors, missing = _prepare(torch, names, inputs, config, library, log)
    if clock.device == "cuda":
        torch.cuda.empty_cache()  # the float64 reference's memory, before timing
    step_ms = least_of_rounds(lambda fn: clock.median_ms(fn, steps), ready)
    host_ms = least_of_rounds(lambda fn: clock.host_ms(fn, host_steps), ready)
    timed = {
        n: {"step": step_ms[n], "host": host_ms[n], "unqueued": fn in clock.unqueued, "errors": errors[n]}
        for n, fn in ready.items()
    }
    return _cell_rows(meta, config, rows, hidden, names, timed, missing, copy, l2)


# ---------------------------------------------------------------- outputs


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _shape_label(row: dict) -> str:
    return f"{row['rows']}×{row['hidden']}"


def _table(title: str, cells: list[dict], names: list[str], value: Callable[[dict], str], extra=None) -> list[str]:
    """A markdown table: one line per shape, one column per implementation (`—` where missing)."""
    head = ["M×N", *names] + ([extra[0]] if extra else [])
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape in dict.fromkeys((r["rows"], r["hidden"]) for r in cells):
        mine = {r["impl"]: r for r in cells if (r["rows"], r["hidden"]) == shape}
        first = next(iter(mine.values()))
        label = _shape_label(first) + (" ‡" if first.get("x_in_l2") is True else "")
        values = [value(mine[n]) if mine.get(n, {}).get("step_us", "") != "" else "—" for n in names]
        lines.append("| " + " | ".join([label, *values] + ([extra[1](mine)] if extra else [])) + " |")
    return lines + [""]


def _best_peer_cell(mine: dict) -> str:
    parts = [
        f"{n} {mine[n]['over_best_peer']:.2f}×"
        for n in ("lntune", "lntune-compile")
        if mine.get(n, {}).get("over_best_peer", "") != ""
    ]
    return ", ".join(parts) or "—"


def _config_section(config: str, cells: list[dict], names: list[str]) -> list[str]:
    x_dtype, p_dtype = CONFIGS[config]
    lines = [f"## {config} (x, dy {x_dtype}; parameters {p_dtype})", ""]

    def step(r):
        mark = "*" if r["step_unqueued"] else ""
        return f"{r['step_us']:.1f}{mark}" + (f" ({r['vs_torch']:.2f}×)" if r["vs_torch"] != "" else "")

    def host(r):
        return ("≤" if r["host_bounded"] else "") + f"{r['host_us']:.1f}"

    mine = any(n.startswith("lntune") for n in names)
    extra = ("lntune over best peer", _best_peer_cell) if mine else None
    lines += _table("Step time, µs per step (× speed of torch eager):", cells, names, step, extra)
    lines += _table("Fraction of copy bandwidth:", cells, names, lambda r: f"{r['fraction_of_copy']:.3g}")
    lines += _table("Host time, µs per step issued without synchronising:", cells, names, host)
    reasons = dict.fromkeys(f"{r['impl']} at {_shape_label(r)}: {r['missing']}" for r in cells if r["missing"])
    if reasons:
        lines += ["Missing cells:", ""] + [f"- {reason}" for reason in reasons] + [""]
    return lines


def markdown(rows: list[dict], info: dict) -> str:
    """The report: one section per config, with what each column means."""
    cells = [r for r in rows if r["impl"] != "copy"]
    names = [n for n in IMPLEMENTATIONS if any(r["impl"] == n for r in cells)]
    lines = [
        f"# lntune training-step benchmark — {info['device']}, {info['date']}",
        "",
        f"torch {info['torch']}; lntune library: {info['library']}; device-to-device copy "
        f"{info['copy_gbps']:.0f} GB/s (read + write), measured in this run; {info['steps']} steps per timed batch.",
        "",
        "Each step goes **through the public API** — gradients set to None, `y = module(x)`, `y.backward(dy)` — "
        "so module code, autograd and allocations are inside every number; it is not a kernel-only number "
        "(`lntune bench` times the bare kernels). Implementations: `torch` torch.nn.LayerNorm eager; "
        "`torch-compile` torch.compile of it (inductor, default mode, static shapes); `liger` Liger-Kernel's "
        "LigerLayerNorm; `lntune` lntune.torch.LayerNorm eager; `lntune-compile` torch.compile of it "
        "(fullgraph=True). Each passed a float64 reference check of y, dx, dweight and dbias before timing.",
        "",
        "- Step time: device time per step, CUDA events around a batch of back-to-back steps after warm-up "
        "(compilation included in warm-up), the device held by a spin kernel until the host has queued the whole "
        "batch, so that the host's launch cost is not in it (it is in Host time); the median of "
        f"{BATCHES} batches, the least of {ROUNDS} rounds taken in turn over the implementations (wall time on a "
        "CPU). In brackets: torch eager's time over this one's. *: the step could not be queued ahead (it waits "
        "for the device inside), so its time includes the host's gaps.",
        "- lntune over best peer: the fastest of torch, torch-compile and liger over lntune's step time.",
        "- Fraction of copy: the step's least traffic, 5·M·N·itemsize (forward reads x, writes y; backward reads "
        "x and dy, writes dx) plus parameters and statistics, per step time, over the copy's GB/s. ‡: x fits in "
        f"the {info['l2_mb']} MB L2, so the step is partly cache-resident and can pass what DRAM allows.",
        f"- Host time: wall time of {info['host_steps']} steps issued without synchronising, over their count — "
        "on a GPU, the CPU's cost of issuing a step. ≤: the step time is at least 0.9 of this, so the device may "
        "have set the pace (a full launch queue) and the host's own cost is at most this.",
        "",
    ]
    for config in dict.fromkeys(r["config"] for r in cells):
        lines += _config_section(config, [r for r in cells if r["config"] == config], names)
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Step time per shape per implementation, one panel per config (matplotlib; ImportError if missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in rows if r["impl"] != "copy" and r.get("step_us", "") != ""]
    configs = list(dict.fromkeys(r["config"] for r in cells))
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.5), squeeze=False)
    for ax, config in zip(axes[0], configs):
        mine = [r for r in cells if r["config"] == config]
        labels = list(dict.fromkeys(_shape_label(r) for r in mine))
        for name in dict.fromkeys(r["impl"] for r in mine):
            pts = [(labels.index(_shape_label(r)), r["step_us"]) for r in mine if r["impl"] == name]
            style = "-" if name.startswith("lntune") else "--"
            marker = "s" if name.endswith("compile") else "o"  # lntune and lntune-compile often coincide
            color = f"C{IMPLEMENTATIONS.index(name)}" if name in IMPLEMENTATIONS else None  # same in every panel
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, style, marker=marker, color=color, label=name, markerfacecolor="none")
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("shape M×N")
        ax.set_ylabel("µs per training step")
        ax.set_title(config)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    files.write_bytes_atomic(path, buf.getvalue())


# ---------------------------------------------------------------- entry point


def _device_name(torch, device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"CPU {platform.machine()}"


def _file_safe(text: str) -> str:
    """Spaces (and anything else a file name should not hold) as underscores, as `lntune bench` names files."""
    return re.sub(r"[^\w.+-]", "_", text)


def _l2_bytes(torch, device: str) -> int | None:
    if device != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or DEFAULT_L2_BYTES


def run(
    library: str | Path | None,
    shapes: list[tuple[int, int]] | None,
    configs: list[str] | None,
    out: Path,
    tag: str = "",
    steps: int = 20,
    log: Callable[[str], object] = print,
    *,
    implementations: list[str] | None = None,
    host_steps: int = HOST_STEPS,
) -> Path:
    """Benchmark one LayerNorm training step per shape × config × implementation; write
    `out/step-<device>-<date>[-tag].{csv,md,png}` and return the markdown's path.

    library: an lntune export directory for lntune's modules (None: lntune.torch finds its variants itself).
    shapes: (rows, hidden) pairs (default DEFAULT_SHAPES); configs: names of CONFIGS (default DEFAULT_CONFIGS);
    implementations: a subset of IMPLEMENTATIONS including "torch" (default all). Raises WrongResult when an
    lntune implementation disagrees with the float64 reference.
    """
    shapes = DEFAULT_SHAPES if shapes is None else shapes
    configs = DEFAULT_CONFIGS if configs is None else configs
    implementations = IMPLEMENTATIONS if implementations is None else implementations
    _check_arguments(shapes, configs, steps, host_steps, implementations, tag)
    shapes, names = [(int(m), int(n)) for m, n in shapes], list(implementations)
    if library is not None and not Path(library).exists():
        raise FileNotFoundError(f"library must be an lntune export directory or None, {library} does not exist")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _configure_compile(torch)
    clock = Clock(torch, device)
    name, date = _device_name(torch, device), datetime.date.today().isoformat()
    meta = {"device": name, "date": date, "torch": torch.__version__, "device_kind": device}
    copy = copy_gbps(clock)
    l2 = _l2_bytes(torch, device)
    log(f"{name}: device-to-device copy {copy:.0f} GB/s")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{tag.lstrip('-')}" if tag else ""
    stem = out / f"step-{_file_safe(name)}-{date}{suffix}"
    results = [{**meta, "impl": "copy", "gbps": round(copy, 1), "fraction_of_copy": 1.0}]
    for config in configs:
        for rows, hidden in shapes:
            log(f"{config} {rows}x{hidden}")
            results += measure_cell(
                torch, clock, meta, rows, hidden, config, names, library, steps, host_steps, copy, l2, log
            )
            files.write_bytes_atomic(
                stem.with_suffix(".csv"), _csv_text(results).encode()
            )  # a cut-short run keeps its cells
    info = {**meta, "library": library or "lntune's own cache", "copy_gbps": copy, "steps": steps}
    info |= {"host_steps": host_steps, "l2_mb": round((l2 or DEFAULT_L2_BYTES) / 2**20)}
    md = stem.with_suffix(".md")
    files.write_bytes_atomic(md, markdown(results, info).encode())
    try:
        plot(results, stem.with_suffix(".png"))
    except ImportError:
        log("matplotlib is not importable: no plot written")
    log(md.read_text())
    return md


__all__ = ["CONFIGS", "DEFAULT_CONFIGS", "DEFAULT_SHAPES", "IMPLEMENTATIONS", "WrongResult", "markdown", "plot", "run"]
