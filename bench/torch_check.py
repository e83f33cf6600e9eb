"""lntune.torch end to end on a GPU (or the CPU): what a training loop does, against float64.

    python3 bench/torch_check.py [LIBRARY_DIR] [--hidden N,...] [--rows M,...]

Without LIBRARY_DIR the variants come from lntune's per-user cache ($LNTUNE_CACHE), built on first
use. Checks, each printed as one line and counted (exit 1 if any fails):
- values and gradients (autograd) of every dtype, 16-bit activations with float32 parameters
  included, at odd row counts, against torch's layer_norm in float64 on the same rounded inputs,
  on a side CUDA stream (the kernels must follow torch's current stream);
- misaligned views (4 and 16 bytes off an allocation), a column-major x, a stride-0 dy;
- constant rows at eps = 1e-12: y is beta exactly, the gradients finite;
- CUDA autocast: the output dtype and values torch.nn.LayerNorm gives;
- torch.compile (inductor, fullgraph) over several row counts, counting the graphs compiled, and
  mode="reduce-overhead" (CUDA graphs): gradients right on every replay;
- host time of Library.forward / Library.backward per call (microseconds, calls not synchronised).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
RESULTS: list[bool] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append(ok)
    print(f"{'ok    ' if ok else 'FAILED'} {name}{': ' + detail if detail else ''}", flush=True)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float(torch.linalg.vector_norm(got - want) / max(torch.linalg.vector_norm(want), 1e-300))


def reference(x, w, b, eps, dy):
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = torch.nn.functional.layer_norm(x64, (x.shape[-1],), w64, b64, eps)
    return (y64, *torch.autograd.grad(y64, (x64, w64, b64), dy.double()))


def inputs(rows, hidden, dtype, param_dtype, device, gen):
    x = (torch.randn(rows, hidden, device=device, generator=gen, dtype=torch.float64) + 3).to(dtype)
    w = (1 + 0.5 * torch.randn(hidden, device=device, generator=gen, dtype=torch.float64)).to(param_dtype)
    b = torch.randn(hidden, device=device, generator=gen, dtype=torch.float64).to(param_dtype)
    dy = torch.randn(rows, hidden, device=device, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def check_values(lt, library, hidden, dtype, param_dtype, rows, device) -> None:
    gen = torch.Generator(device=device).manual_seed(hidden * 31 + rows)
    x, w, b, dy = inputs(rows, hidden, dtype, param_dtype, device, gen)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    side = torch.cuda.Stream() if device == "cuda" else None
    with torch.cuda.stream(side) if side else contextlib.nullcontext():
        y = lt.layer_norm(x, hidden, w, b, 1e-5, library=library)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    if side:
        side.synchronize()
    want = reference(x, w, b, 1e-5, dy)
    name = f"values N={hidden} {dtype}/{param_dtype} M={rows}"
    errors = [rel(g, r) for g, r in zip((y, *grads), want)]
    tolerances = [TOLERANCE[dtype], TOLERANCE[dtype], TOLERANCE[param_dtype], TOLERANCE[param_dtype]]
    dtypes_ok = y.dtype == dtype and grads[1].dtype == param_dtype and grads[0].dtype == dtype
    detail = " ".join(f"{n}={e:.1e}/{t:.0e}" for n, e, t in zip(("y", "dx", "dw", "db"), errors, tolerances))
    report(name, dtypes_ok and all(e <= t for e, t in zip(errors, tolerances)), detail)


def check_layouts(lt, library, hidden, dtype, device) -> None:
    """Views the kernels cannot read in place are copied, and the results stay right."""
    rows = 333
    flat = torch.randn(rows * hidden + 2 * hidden + 64, device=device).to(dtype)
    item = flat.element_size()
    for offset_bytes in (4 if item == 4 else 2, 16):
        off = offset_bytes // item
        w = flat[off : off + hidden]
        b = flat[off + hidden : off + 2 * hidden]
        x = (flat[off + 2 * hidden : off + 2 * hidden + rows * hidden].view(rows, hidden) + 2).detach()
        x_view = flat[off + 2 * hidden : off + 2 * hidden + rows * hidden].view(rows, hidden).requires_grad_()
        for name, xin in (("misaligned x", x_view), ("column-major x", x.t().contiguous().t().requires_grad_())):
            y = lt.layer_norm(xin, hidden, w, b, 1e-5, library=library)
            (gx,) = torch.autograd.grad(y.sum(), (xin,))  # stride-0 dy
            want = reference(xin, w, b, 1e-5, torch.ones(rows, hidden, device=device))
            err = max(rel(y, want[0]), rel(gx, want[1]) if want[1].abs().max() > 1e-3 else 0.0)
            report(
                f"{name} {offset_bytes} B off, weight views, stride-0 dy, N={hidden} {dtype}", err <= 1e-2, f"{err:.1e}"
            )


def check_constant_rows(lt, library, hidden, dtype, device) -> None:
    x = torch.full((5, hidden), -7.3, device=device, dtype=dtype).requires_grad_()
    w = torch.randn(hidden, device=device, dtype=dtype).requires_grad_()
    b = torch.randn(hidden, device=device, dtype=dtype).requires_grad_()
    y = lt.layer_norm(x, hidden, w, b, 1e-12, library=library)
    grads = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    finite = all(torch.isfinite(g).all() for g in grads)
    report(f"constant rows eps=1e-12 N={hidden} {dtype}", torch.equal(y, b.detach().expand_as(y)) and finite)


def check_autocast(lt, library, hidden, device) -> None:
    ours = lt.LayerNorm(hidden, library=library).to(device)
    theirs = torch.nn.LayerNorm(hidden).to(device)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.load_state_dict(ours.state_dict())
    x = torch.randn(64, hidden, device=device, dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, want = ours(x), theirs(x)
    report(
        f"autocast {device} bf16 N={hidden}",
        y.dtype == want.dtype and rel(y, want) <= 1e-5,
        f"{y.dtype} vs {want.dtype}",
    )


def check_compile(lt, library, hidden, device, mode: str | None) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = lt.LayerNorm(hidden, library=library).to(device)
    compiled = torch.compile(module, fullgraph=True, mode=mode)
    worst = 0.0
    rows_list = (96, 130, 257, 96, 96, 96) if mode else (96, 130, 257, 1000)
    for step, rows in enumerate(rows_list):
        x = (torch.randn(rows, hidden, device=device) + 1).requires_grad_()
        dy = torch.randn(rows, hidden, device=device)
        with torch.no_grad():
            module.weight.add_(0.01 * step)
        y = compiled(x)
        grads = torch.autograd.grad(y, (x, module.weight, module.bias), dy)
        want = reference(x, module.weight, module.bias, 1e-5, dy)
        worst = max(worst, rel(y, want[0]), *(rel(g, r) for g, r in zip(grads, want[1:])))
    graphs = counters["stats"]["unique_graphs"]
    report(
        f"torch.compile mode={mode} N={hidden} M={rows_list}",
        worst <= 1e-4 and graphs <= 2,
        f"{worst:.1e}, {graphs} graphs",
    )


def host_time(lt, library, hidden, device) -> None:
    x = torch.randn(4096, hidden, device=device)
    w, b = torch.randn(hidden, device=device), torch.randn(hidden, device=device)
    lib = lt.library_for(x.device, hidden, torch.float32, library=library)
    y, mean, rstd = lib.forward(x, w, b)
    dy = torch.randn_like(x)
    for name, call in (
        ("forward", lambda: lib.forward(x, w, b)),
        ("backward", lambda: lib.backward(dy, x, mean, rstd, w)),
    ):
        for _ in range(50):
            call()
        torch.cuda.synchronize() if device == "cuda" else None
        start, count = time.perf_counter(), 2000
        for _ in range(count):
            call()
        us = (time.perf_counter() - start) / count * 1e6
        torch.cuda.synchronize() if device == "cuda" else None
        print(f"host   Library.{name} N={hidden} float32 M=4096: {us:.1f} us a call", flush=True)


def guarded(check, *args) -> None:
    """Run one check; an exception is a failed check, reported, and the next one still runs."""
    try:
        check(*args)
    except Exception as err:  # noqa: BLE001
        report(f"{check.__name__}{args[2:]}", False, f"{type(err).__name__}: {str(err)[:300]}")


def main() -> int:
    import lntune.torch as lt

    p = argparse.ArgumentParser()
    p.add_argument("library", nargs="?", default=None)
    p.add_argument("--hidden", default="1024,1000")
    p.add_argument("--rows", default="1,37,4099")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden = [int(h) for h in args.hidden.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    combos = [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ]
    for n in hidden:
        for dtype, param in combos:
            for rows in rows_list:
                guarded(check_values, lt, args.library, n, dtype, param, rows, device)
        for dtype in (torch.float32, torch.bfloat16):
            guarded(check_layouts, lt, args.library, n, dtype, device)
            guarded(check_constant_rows, lt, args.library, n, dtype, device)
    n = hidden[0]
    if device == "cuda":
        guarded(check_autocast, lt, args.library, n, device)
    guarded(check_compile, lt, args.library, n, device, None)
    if device == "cuda":
        guarded(check_compile, lt, args.library, n, device, "reduce-overhead")
    guarded(host_time, lt, args.library, n, device)
    print(f"{sum(RESULTS)} passed, {len(RESULTS) - sum(RESULTS)} failed")
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
