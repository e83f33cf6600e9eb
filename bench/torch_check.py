"""lntune.torch end to end on a library's device: forward and autograd gradients against float64.

    python3 bench/torch_check.py LIBRARY_DIR [ROWS]

For each dtype the library has (its smallest hidden size): `lntune.torch.layer_norm` forward and
backward through autograd, on a side CUDA stream where there is a GPU (the kernels must follow
torch's current stream, and the backward's partials come from torch's allocator on it), against
torch's float64 layer_norm on the same rounded inputs (relative norms, te_ops' tolerances; a
non-finite value fails). ROWS (default 4099) ends a row chunk mid-way. Prints one line per check
and exits 1 if any fails. (`lntune check` is the test that poisons outputs first.)
bench/gpu_job.sh runs it after `lntune check`, with the runtime-only TVM.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check(library, hidden: int, dtype: str, rows: int, device: str) -> list[tuple[str, float, float]]:
    import lntune.torch as lt
    from te_ops.reference import TOLERANCE

    gen = torch.Generator(device=device).manual_seed(hidden)
    tdt = getattr(torch, dtype)
    x64 = (torch.randn(rows, hidden, device=device, generator=gen, dtype=torch.float64) + 3).to(tdt)
    w64, b64 = (torch.randn(hidden, device=device, generator=gen, dtype=torch.float64).to(tdt) for _ in range(2))
    upstream = torch.randn(rows, hidden, device=device, generator=gen, dtype=torch.float64).to(tdt)
    x, w, b = (t.clone().requires_grad_() for t in (x64, w64, b64))
    side = torch.cuda.Stream() if device == "cuda" else None
    with torch.cuda.stream(side) if side else contextlib.nullcontext():
        y = lt.layer_norm(x, (hidden,), w, b, library=library)
        y.backward(upstream)
    if side:
        side.synchronize()
    want = [t.double().requires_grad_() for t in (x64, w64, b64)]
    y_ref = torch.nn.functional.layer_norm(want[0], (hidden,), want[1], want[2], 1e-5)
    y_ref.backward(upstream.double())
    results = []
    for name, got, ref in zip(
        ("y", "dx", "dgamma", "dbeta"), (y, x.grad, w.grad, b.grad), (y_ref, *(t.grad for t in want))
    ):
        got = got.detach().double()
        error = float(torch.linalg.vector_norm(got - ref.detach()) / torch.linalg.vector_norm(ref.detach()))
        results.append((name, error if torch.isfinite(got).all() else float("inf"), TOLERANCE[dtype]))
    return results


def main() -> int:
    import lntune

    library = lntune.load(sys.argv[1])
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4099
    device = "cuda" if library.manifest["device"] == "cuda" else "cpu"
    failed = 0
    for dtype in dict.fromkeys(dt for _, dt in library.variants):
        hidden = min(n for n, dt in library.variants if dt == dtype)
        for name, error, tolerance in check(library, hidden, dtype, rows, device):
            ok = error <= tolerance
            failed += not ok
            print(
                f"lntune.torch {device} N={hidden} {dtype} M={rows} {name}: {error:.1e} (tolerance {tolerance:.0e}) "
                f"{'ok' if ok else 'FAILED'}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
