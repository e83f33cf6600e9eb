"""lntune's CPU kernels against torch's CPU layer_norm, as ratios measured in one process.

    python bench/cpu_ratio.py DIR [DIR ...]      # llvm exports (lntune export --target llvm ...)
    M=4096 N=1024 DT=float32 THREADS=2 REPS=300 python bench/cpu_ratio.py DIR

For each export: a training step's LayerNorm (lntune forward, then backward + partials sum, through
lntune.Library with torch tensors) against torch.nn.functional.layer_norm with requires_grad input,
weight and bias, forward + .backward(dy); and the forward and backward alone against
torch.native_layer_norm and aten's native_layer_norm_backward. Both sides run on THREADS threads
(torch.set_num_threads; TVM's pool through schedules.host.configure_thread_pool, default: the
cores this process may use). Outputs are checked against torch's first.

Timing: blocks of BLOCK calls per implementation, the implementations taken in turn, 10 ms of
sleep before each block (the other thread pool's spinning workers are asleep by then: torch's
OpenMP and TVM's pools spin after a parallel region, and on a loaded machine each stole the other's
cores), the median of the per-call wall times. On a shared machine only the ratios mean anything.
"""

from __future__ import annotations

import os
import statistics
import sys
import time


def main(paths: list[str]) -> int:
    import torch

    import lntune
    from schedules import host

    rows, hidden = int(os.environ.get("M", 4096)), int(os.environ.get("N", 1024))
    threads = int(os.environ.get("THREADS", host.host_threads()))
    dtname = os.environ.get("DT", "float32")
    reps, block = int(os.environ.get("REPS", 300)), int(os.environ.get("BLOCK", 5))
    torch.set_num_threads(threads)
    os.environ.pop("TVM_NUM_THREADS", None)
    tvm_threads = host.configure_thread_pool(threads)
    dtype = getattr(torch, dtname)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    dy = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    b = torch.randn(hidden, generator=g).to(dtype)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))

    def torch_step():
        xr.grad = wr.grad = br.grad = None
        y = torch.nn.functional.layer_norm(xr, (hidden,), wr, br, 1e-5)
        y.backward(dy)
        return y.detach(), xr.grad, wr.grad, br.grad

    _, mean_t, rstd_t = torch.native_layer_norm(x, (hidden,), w, b, 1e-5)
    fns = {
        "torch": torch_step,
        "torch_fwd": lambda: torch.native_layer_norm(x, (hidden,), w, b, 1e-5),
        "torch_bwd": lambda: torch.ops.aten.native_layer_norm_backward(
            dy, x, (hidden,), mean_t, rstd_t, w, b, [True, True, True]
        ),
    }
    want = torch_step()
    tolerance = 1e-4 if dtname == "float32" else 2e-2
    for path in paths:
        lib = lntune.load(path)
        name = os.path.basename(os.path.normpath(path))

        def step(lib=lib):
            y, mean, rstd = lib.forward(x, w, b, 1e-5)
            return (y, *lib.backward(dy, x, mean, rstd, w))

        for got, ref in zip(step(), want, strict=True):
            error = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
            if error > tolerance:
                raise SystemExit(f"{name}: off torch by {error:.2e} (relative to the largest value)")
        _, mean, rstd = lib.forward(x, w, b, 1e-5)
        fns[name] = step
        fns[name + "_fwd"] = lambda lib=lib: lib.forward(x, w, b, 1e-5)
        fns[name + "_bwd"] = lambda lib=lib, mean=mean, rstd=rstd: lib.backward(dy, x, mean, rstd, w)
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, reps // block)):
        for key, fn in fns.items():
            time.sleep(0.01)
            fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    median = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    print(
        f"M={rows} N={hidden} {dtname}, threads: torch {torch.get_num_threads()}, TVM {tvm_threads}; "
        f"{len(times['torch'])} calls each, medians"
    )
    print(f"{'':16} {'us':>9} {'torch / this':>13}")
    for key, us in median.items():
        peer = "torch" + next((end for end in ("_fwd", "_bwd") if key.endswith(end)), "")
        print(f"{key:16} {us:9.1f} {median[peer] / us:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
