"""`lntune bench`: lntune's kernels against ATen, torch.compile and Liger on one GPU, in one run.

For each (hidden N, dtype) variant of a library, M = elements // N rows (past the 50 MB L2 for the
default 64 Mi elements). Every implementation is checked against the float64 reference before it is
timed; times are medians of CUDA-event-timed repeats, queued back to back, after warm-up, the least of
ROUNDS such medians (the rounds taken in turn over all implementations of a shape; the copy's likewise).
Effective bandwidth counts the minimal bytes (backward: read x and dy, write dx; forward: read x, write y;
statistics: read x) and is reported as a fraction of a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import csv
import datetime
import statistics
from pathlib import Path

from lntune.runner import STATS_DTYPE, load
from lntune.timing import ROUNDS, least_of_rounds
from te_ops import reference

EPS = 1e-5
WARMUP, REPEATS = 5, 40
CHECK_ROWS = 2048  # rows checked against the float64 reference (the full tensor would take minutes)
FIELDS = ["device", "date", "impl", "pass", "dtype", "hidden", "rows", "ms", "gbps", "fraction_of_copy", "rel_error"]


def _time(fn, torch) -> float:
    """Median milliseconds of fn() over REPEATS, by CUDA events, after WARMUP calls.

    The calls are queued back to back, as a training step queues them, and each event pair brackets
    one call's work on the device. The host's cost of launching (Python, argument conversion) counts
    only where it exceeds the device time, since the device then waits for it: the same rule for
    every implementation. (Waiting for each call instead adds every implementation's launch latency
    to its time: docs/performance.md, section 1.)
    """
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPEATS)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth(torch, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = min(_time(lambda: dst.copy_(src), torch) for _ in range(ROUNDS))
    return 2 * nbytes / ms / 1e6


class Impls:
    """The implementations under test for one (N, dtype): callables for each pass, same inputs."""

    def __init__(self, torch, lib, x, gamma, beta, dy, peers):
        self.torch, self.lib = torch, lib
        self.x, self.gamma, self.beta, self.dy = x, gamma, beta, dy
        self.rows, self.hidden = x.shape
        self.dtype = str(x.dtype).removeprefix("torch.")
        self.peers = peers
        self.passes = {}  # (impl, pass) -> callable returning outputs
        self._lntune()
        if "api" in peers:
            self._api()
        if "aten" in peers:
            self._aten()
        if "compile" in peers:
            self._compiled()
        if "liger" in peers:
            self._liger()

    def _lntune(self):
        torch, lib, (m, n), dt = self.torch, self.lib, self.x.shape, self.dtype
        fwd, stats = lib.kernel("forward", n, dt), lib.kernel("forward_stats", n, dt)
        bwd, bsum = lib.kernel("backward", n, dt), lib.kernel("backward_sum", n, dt)
        y, dx = torch.empty_like(self.x), torch.empty_like(self.x)
        mean, rstd = (torch.empty(m, dtype=torch.float32, device="cuda") for _ in range(2))
        parts = [torch.empty(lib.parts_for(n, dt), n, dtype=torch.float32, device="cuda") for _ in range(2)]
        dgamma, dbeta = torch.empty_like(self.gamma), torch.empty_like(self.gamma)
        fwd(self.x, self.gamma, self.beta, EPS, y, mean, rstd)
        self.mean, self.rstd = mean.clone(), rstd.clone()

        def forward():
            fwd(self.x, self.gamma, self.beta, EPS, y, mean, rstd)
            return y, mean, rstd

        def statistics_():
            stats(self.x, EPS, mean, rstd)
            return mean, rstd

        def backward():
            bwd(self.dy, self.x, self.mean, self.rstd, self.gamma, dx, *parts)
            bsum(*parts, dgamma, dbeta)
            return dx, dgamma, dbeta

        self.passes.update(
            {("lntune", "forward"): forward, ("lntune", "stats"): statistics_, ("lntune", "backward"): backward}
        )

    def _api(self):
        """lntune through its Python API on torch tensors (`lntune.load(...).forward/backward`, what
        lntune.torch calls): argument checks, output allocation and DLPack per call. "lntune" above
        times the bare kernels on buffers allocated once; the gap is the API's cost, which shows at
        small M where a kernel takes microseconds."""
        lib, x, g, b = self.lib, self.x, self.gamma, self.beta
        self.passes[("lntune-api", "forward")] = lambda: lib.forward(x, g, b)
        self.passes[("lntune-api", "backward")] = lambda: lib.backward(self.dy, x, self.mean, self.rstd, g)

    def _aten(self):
        aten, n = self.torch.ops.aten, self.hidden
        mean, rstd = self.mean.view(-1, 1), self.rstd.view(-1, 1)
        self.passes[("aten", "forward")] = lambda: aten.native_layer_norm(self.x, [n], self.gamma, self.beta, EPS)
        self.passes[("aten", "backward")] = lambda: aten.native_layer_norm_backward(
            self.dy, self.x, [n], mean, rstd, self.gamma, self.beta, [True, True, True]
        )

    def _autograd_pair(self, name, layer_norm):
        """forward and backward callables of an autograd LayerNorm (backward replays one graph)."""
        torch = self.torch
        x = self.x.detach().requires_grad_(True)
        g = self.gamma.detach().requires_grad_(True)
        b = self.beta.detach().requires_grad_(True)
        with torch.no_grad():
            self.passes[(name, "forward")] = lambda: layer_norm(self.x, self.gamma, self.beta)
        y = layer_norm(x, g, b)
        self.passes[(name, "backward")] = lambda: torch.autograd.grad(y, (x, g, b), self.dy, retain_graph=True)

    def _compiled(self):
        import importlib

        torch = self.torch
        for module in ("torch._dynamo.config", "torch._functorch.config"):
            importlib.import_module(module)
        # Backward is timed by replaying one graph (retain_graph), which donated buffers forbid.
        torch._functorch.config.donated_buffer = False
        torch._dynamo.config.recompile_limit = 64
        n = self.hidden
        fn = torch.compile(lambda x, g, b: torch.nn.functional.layer_norm(x, (n,), g, b, EPS))
        self._autograd_pair("torch.compile", fn)

    def _liger(self):
        try:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        except ImportError:
            return
        self._autograd_pair("liger", lambda x, g, b: LigerLayerNormFunction.apply(x, g, b, EPS))


def _errors(impl: str, pass_: str, outputs, ref) -> float:
    """Worst relative error of an implementation's outputs on the first CHECK_ROWS rows."""
    k = CHECK_ROWS
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)

    def host(t):
        return t.detach().float().cpu().numpy()

    if pass_ == "forward":
        y = outputs[0]
        return reference.rel_error(host(y[:k]), ref["y"])
    if pass_ == "stats":
        return max(
            reference.rel_error(host(outputs[0][:k]), ref["mean"]),
            reference.rel_error(host(outputs[1][:k]), ref["rstd"]),
        )
    dx, dgamma, dbeta = outputs[:3]
    errs = [reference.rel_error(host(dx[:k]), ref["dx"])]
    # Column sums cover all rows; compare them with the full-size reference sums.
    errs += [reference.rel_error(host(dgamma), ref["dgamma"]), reference.rel_error(host(dbeta), ref["dbeta"])]
    return max(errs)


def _reference(torch, impls: Impls) -> dict:
    k = CHECK_ROWS
    x, g, b, dy = (t.double() for t in (impls.x, impls.gamma, impls.beta, impls.dy))
    mean, rstd = impls.mean.double(), impls.rstd.double()
    xhat = (x - mean[:, None]) * rstd[:, None]
    y_ref, m_ref, r_ref = reference.forward(*(t.cpu().numpy() for t in (x[:k], g, b)), EPS)
    dx_ref = reference.backward(*(t.cpu().numpy() for t in (dy[:k], x[:k], mean[:k], rstd[:k], g)))[0]
    return {
        "y": y_ref,
        "mean": m_ref,
        "rstd": r_ref,
        "dx": dx_ref,
        "dgamma": (dy * xhat).sum(0).cpu().numpy(),
        "dbeta": dy.sum(0).cpu().numpy(),
    }


BYTES_PER_ELEMENT_PASSES = {"forward": 2, "stats": 1, "backward": 3}


def _tolerance(dtype: str, pass_: str) -> float:
    return reference.TOLERANCE[dtype] if pass_ != "stats" else reference.TOLERANCE[STATS_DTYPE]


def _least_of_rounds(passes: dict, torch) -> dict:
    """ms of each of `passes` (key -> callable): the least of ROUNDS medians (`_time`), the rounds
    taken in turn over all of them (`timing.least_of_rounds`)."""
    return least_of_rounds(lambda fn: _time(fn, torch), passes)


def bench_variant(torch, lib, hidden: int, dtype: str, rows: int, peers, copy_gbps: float, meta) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(hidden)
    tdt = getattr(torch, dtype)
    x = (torch.randn(rows, hidden, device="cuda", generator=gen) + 3.0).to(tdt)
    gamma = (1.0 + 0.5 * torch.randn(hidden, device="cuda", generator=gen)).to(tdt)
    beta = torch.randn(hidden, device="cuda", generator=gen).to(tdt)
    dy = torch.randn(rows, hidden, device="cuda", generator=gen).to(tdt)
    impls = Impls(torch, lib, x, gamma, beta, dy, peers)
    ref = _reference(torch, impls)
    itemsize = x.element_size()
    results, errors, timed = [], {}, {}
    for (impl, pass_), fn in impls.passes.items():
        errors[impl, pass_] = err = _errors(impl, pass_, fn(), ref)
        if err <= 2 * _tolerance(dtype, pass_):
            timed[impl, pass_] = fn
        else:  # NaN included
            print(f"  {impl} {pass_} N={hidden} {dtype}: rel. error {err:.2e} over tolerance; not timed")
    best = _least_of_rounds(timed, torch)
    for (impl, pass_), err in errors.items():
        ms = best.get((impl, pass_), float("nan"))
        gbps = BYTES_PER_ELEMENT_PASSES[pass_] * rows * hidden * itemsize / ms / 1e6
        results.append(
            {
                **meta,
                "impl": impl,
                "pass": pass_,
                "dtype": dtype,
                "hidden": hidden,
                "rows": rows,
                "ms": round(ms, 4),
                "gbps": round(gbps, 1),
                "fraction_of_copy": round(gbps / copy_gbps, 3),
                "rel_error": f"{err:.2e}",
            }
        )
    results.append(_determinism(torch, impls, meta, hidden, dtype, rows))
    del impls
    torch.cuda.empty_cache()
    return results


def _determinism(torch, impls: Impls, meta, hidden, dtype, rows) -> dict:
    """dgamma/dbeta of two lntune backward runs must be bitwise equal (no atomics)."""
    first = [t.clone() for t in impls.passes[("lntune", "backward")]()[1:]]
    second = impls.passes[("lntune", "backward")]()[1:]
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    return {
        **meta,
        "impl": "lntune",
        "pass": "determinism",
        "dtype": dtype,
        "hidden": hidden,
        "rows": rows,
        "ms": "",
        "gbps": "",
        "fraction_of_copy": "",
        "rel_error": "bitwise-equal" if same else "DIFFERENT",
    }


def write_markdown(results: list[dict], copy_gbps: float, path: Path) -> None:
    timed = [r for r in results if r["pass"] != "determinism"]
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    lines = [
        f"# lntune benchmark — {timed[0]['device']}, {timed[0]['date']}",
        "",
        f"Device-to-device copy: {copy_gbps:.0f} GB/s (read + write). Cells: fraction of copy bandwidth "
        "(effective GB/s over copy GB/s); in brackets lntune's speed-up over that peer.",
        "",
    ]
    for pass_ in ("backward", "forward", "stats"):
        rows = [r for r in timed if r["pass"] == pass_]
        if not rows:
            continue
        present = [i for i in impls if any(r["impl"] == i for r in rows)]
        lines += [
            f"## {pass_}",
            "",
            "| dtype | N | M | " + " | ".join(present) + " |",
            "|---|---|---|" + "---|" * len(present),
        ]
        for key in dict.fromkeys((r["dtype"], r["hidden"], r["rows"]) for r in rows):
            cell = {r["impl"]: r for r in rows if (r["dtype"], r["hidden"], r["rows"]) == key}
            mine = cell.get("lntune", {}).get("ms")
            cells = []
            for i in present:
                r = cell.get(i)
                if r is None:
                    cells.append("")
                    continue
                speed = f" ({r['ms'] / mine:.2f}×)" if i != "lntune" and mine else ""
                cells.append(f"{r['fraction_of_copy']}{speed}")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
        lines.append("")
    det = [r for r in results if r["pass"] == "determinism"]
    equal = sum(r["rel_error"] == "bitwise-equal" for r in det)
    lines.append(f"Determinism: lntune dgamma/dbeta bitwise equal across runs in {equal}/{len(det)} variants.")
    path.write_text("\n".join(lines) + "\n")


def plot(csv_path: Path, png_path: Path) -> None:
    """GB/s vs N, one line per implementation and dtype, the copy ceiling drawn; one panel per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["pass"] != "determinism" and r["gbps"] not in ("", "nan")]
    passes = [p for p in ("backward", "forward", "stats") if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    copy = {r["impl"]: float(r["gbps"]) for r in rows if r["impl"] == "copy"}
    for ax, pass_ in zip(axes[0], passes):
        mine = [r for r in rows if r["pass"] == pass_]
        for impl, dtype in dict.fromkeys((r["impl"], r["dtype"]) for r in mine):
            pts = sorted((int(r["hidden"]), float(r["gbps"])) for r in mine if (r["impl"], r["dtype"]) == (impl, dtype))
            style = "-" if impl == "lntune" else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{impl} {dtype}")
        if copy:
            ax.axhline(copy["copy"], color="k", lw=1, label="copy ceiling")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size N")
        ax.set_ylabel("effective GB/s")
        ax.set_title(pass_)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("lntune bench needs a CUDA GPU (none is visible)")
    lib = load(args.library)
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    meta = {"device": device, "date": date}
    copy_gbps = copy_bandwidth(torch)
    print(f"{device}: device-to-device copy {copy_gbps:.0f} GB/s")
    results = [
        {
            **meta,
            "impl": "copy",
            "pass": "copy",
            "dtype": "",
            "hidden": "",
            "rows": "",
            "ms": "",
            "gbps": round(copy_gbps, 1),
            "fraction_of_copy": 1.0,
            "rel_error": "",
        }
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{device.replace(' ', '_')}-{date}{args.tag}"
    variants = [
        (h, d)
        for h, d, p in lib.variants
        if p == d and (not args.hidden or h in args.hidden) and (not args.dtype or d in args.dtype)
    ]
    shapes = [(h, d, r) for h, d in variants for r in (args.rows or [max(1, e // h) for e in args.elements])]
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerow(results[0])
        for hidden, dtype, rows in shapes:
            print(f"N={hidden} {dtype} M={rows}", flush=True)
            rows_out = bench_variant(torch, lib, hidden, dtype, rows, args.peers, copy_gbps, meta)
            writer.writerows(rows_out)  # written as it goes: a run cut short keeps what it measured
            f.flush()
            results += rows_out
    write_markdown(results, copy_gbps, stem.with_suffix(".md"))
    try:
        plot(stem.with_suffix(".csv"), stem.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot written")
    print(stem.with_suffix(".md").read_text())
    return 0


__all__ = ["main", "plot", "write_markdown"]
