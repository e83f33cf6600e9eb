"""Reliability checks that need the GPU (issue #6), one command on the GPU host:

    python3 bench/reliability_gpu.py OUT_DIR [big|determinism|index] ...

- big: M·N = 2**31 elements (4 GiB per tensor) through the exported kernels, M = 262144, N = 8192,
  float16 and M = 131072, N = 16384, bfloat16 (a cluster kernel), every output poisoned with NaN
  first, compared with a float64 reference computed in row chunks on the GPU (relative norms
  against the dtype's tolerance).
- determinism: dx, dgamma, dbeta hashed after repeated launches in one process and in two separate
  processes (no atomics: every hash must agree).
- index: the forward and backward built with int32 instead of int64 index arithmetic, timed against
  the int64 kernels with the same knobs at M·N = 2**26 (what 64-bit indexing costs).
Writes a JSON summary per check to OUT_DIR and prints it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

EPS = 1e-5


def _export(directory: Path, hidden: list[int], dtypes: list[str]):
    import lntune
    from lntune.build import export

    if not (directory / "lntune.so").exists():
        export("cuda-sm90", hidden, dtypes, directory)
    return lntune.load(directory)


def _poison(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


BIG_CASES = ((262144, 8192, "float16"), (131072, 16384, "bfloat16"))


def big(out: Path) -> dict:
    """2**31 elements: the kernels index past int32 and still match the float64 reference."""
    lib = _export(Path("/tmp/lntune-rel-big"), sorted({c[1] for c in BIG_CASES}), sorted({c[2] for c in BIG_CASES}))
    result = {}
    for rows, n, dtype in BIG_CASES:
        result[f"{dtype}_n{n}_m{rows}"] = _big_case(lib, rows, n, dtype)
        torch.cuda.empty_cache()
    result["ok"] = all(v["ok"] for v in result.values())
    return result


def _big_case(lib, rows: int, n: int, dtype_name: str) -> dict:
    from te_ops.reference import TOLERANCE

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(rows, n, device="cuda", generator=gen) * 2 + 3).to(dtype)
    dy = torch.randn(rows, n, device="cuda", generator=gen).to(dtype)
    gamma = torch.randn(n, device="cuda", generator=gen).to(dtype)
    beta = torch.randn(n, device="cuda", generator=gen).to(dtype)
    y, dx = _poison((rows, n), dtype), _poison((rows, n), dtype)
    mean, rstd = _poison((rows,), torch.float32), _poison((rows,), torch.float32)
    parts = [_poison((lib.parts_for(n, dtype_name), n), torch.float32) for _ in range(2)]
    dgamma, dbeta = _poison((n,), dtype), _poison((n,), dtype)
    lib.kernel("forward", n, dtype_name)(x, gamma, beta, EPS, y, mean, rstd)
    lib.kernel("backward", n, dtype_name)(dy, x, mean, rstd, gamma, dx, *parts)
    lib.kernel("backward_sum", n, dtype_name)(*parts, dgamma, dbeta)
    torch.cuda.synchronize()
    sums = {k: [0.0, 0.0] for k in ("y", "mean", "rstd", "dx")}  # squared error, squared reference
    dgamma_ref = torch.zeros(n, dtype=torch.float64, device="cuda")
    dbeta_ref = torch.zeros_like(dgamma_ref)
    g64 = gamma.double()
    for start in range(0, rows, 8192):
        rows_ = slice(start, start + 8192)
        x64, dy64 = x[rows_].double(), dy[rows_].double()
        m = x64.mean(1, keepdim=True)
        r = 1 / torch.sqrt(((x64 - m) ** 2).mean(1, keepdim=True) + EPS)
        xhat = (x64 - m) * r
        # The backward takes the kernel's own float32 mean/rstd, as in lntune.check.
        m32, r32 = mean[rows_].double()[:, None], rstd[rows_].double()[:, None]
        xhat32 = (x64 - m32) * r32
        dyg = dy64 * g64
        dx_ref = r32 * (dyg - xhat32 * (dyg * xhat32).mean(1, keepdim=True) - dyg.mean(1, keepdim=True))
        dgamma_ref += (dy64 * xhat32).sum(0)
        dbeta_ref += dy64.sum(0)
        for name, got, want in (
            ("y", y[rows_], xhat * g64 + beta.double()),
            ("mean", mean[rows_], m[:, 0]),
            ("rstd", rstd[rows_], r[:, 0]),
            ("dx", dx[rows_], dx_ref),
        ):
            sums[name][0] += float(((got.double() - want) ** 2).sum())
            sums[name][1] += float((want**2).sum())
    errors = {k: (e / max(r, 1e-300)) ** 0.5 for k, (e, r) in sums.items()}
    for name, got, want in (("dgamma", dgamma, dgamma_ref), ("dbeta", dbeta, dbeta_ref)):
        errors[name] = float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))
    unwritten = {k: int(torch.isnan(t).sum()) for k, t in (("y", y), ("dx", dx), ("dgamma", dgamma), ("dbeta", dbeta))}
    tol = TOLERANCE[dtype_name]
    ok = all(e < tol for e in errors.values()) and not any(unwritten.values())
    return {
        "rows": rows,
        "hidden": n,
        "elements": rows * n,
        "rel_errors": errors,
        "tolerance": tol,
        "nan_left": unwritten,
        "ok": ok,
    }


def _hashes(lib, n: int, dtype: str, rows: int) -> list[str]:
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = (torch.randn(rows, n, device="cuda", generator=gen) + 1).to(torch_dtype)
    dy = torch.randn(rows, n, device="cuda", generator=gen).to(torch_dtype)
    gamma = torch.randn(n, device="cuda", generator=gen).to(torch_dtype)
    _, mean, rstd = lib.forward(x, gamma, gamma)
    digests = []
    for _ in range(5):
        dx, dgamma, dbeta = lib.backward(dy, x, mean, rstd, gamma)
        torch.cuda.synchronize()
        blob = b"".join(t.cpu().view(torch.uint8).numpy().tobytes() for t in (dx, dgamma, dbeta))
        digests.append(hashlib.sha256(blob).hexdigest()[:16])
    return digests


def determinism(out: Path) -> dict:
    """Bitwise-equal results across 5 launches in a process and across two processes."""
    cases = [
        (768, "bfloat16", 87381),
        (1024, "bfloat16", 65536),
        (8192, "float32", 8192),
        (16384, "float16", 4096),  # cluster kernels: the counted exchange
        (16384, "bfloat16", 4096),
        (16384, "float32", 4096),  # and the tagged one
    ]
    lib_dir = Path("/tmp/lntune-rel-det")
    _export(lib_dir, sorted({c[0] for c in cases}), sorted({c[1] for c in cases}))
    runs = []
    for _ in range(2):
        code = (
            "import json, sys; sys.argv = ['x']; import lntune; from bench.reliability_gpu import _hashes; "
            f"lib = lntune.load('{lib_dir}'); "
            f"print(json.dumps([_hashes(lib, n, d, m) for n, d, m in {cases!r}]))"
        )
        text = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(text.strip().splitlines()[-1]))
    result = {}
    for i, (n, dtype, rows) in enumerate(cases):
        digests = runs[0][i] + runs[1][i]
        result[f"{dtype}_n{n}_m{rows}"] = {"distinct_hashes": len(set(digests)), "launches": len(digests)}
    result["ok"] = all(v["distinct_hashes"] == 1 for k, v in result.items() if k != "ok")
    return result


@contextlib.contextmanager
def _int32_indices():
    """te_ops builds its kernels with int32 row counts and extents while inside (an experiment only)."""
    from tvm import tirx

    from te_ops import layer_norm

    wide = layer_norm._rows, layer_norm._dim
    layer_norm._rows = lambda rows: tirx.Var("M", "int32") if rows is None else tirx.IntImm("int32", rows)
    layer_norm._dim = lambda extent: tirx.IntImm("int32", extent)
    try:
        yield
    finally:
        layer_norm._rows, layer_norm._dim = wide


def index(out: Path) -> dict:
    """Time the same schedules, on the same inputs, with int64 and with int32 index arithmetic."""
    import tvm

    from lntune.build import kernels_for
    from lntune.select import device_arguments, time_us
    from schedules import database
    from schedules.targets import get_target

    target, device = get_target("cuda-sm90"), tvm.cuda(0)
    rng = np.random.default_rng(0)
    result = {}
    for n, dtype in ((1024, "float32"), (1024, "bfloat16"), (4096, "float32"), (4096, "bfloat16")):
        for kernel in (k for k in kernels_for(n, dtype, target) if k.op in ("forward", "backward")):
            knobs = database.choose(kernel, target).knobs
            args = device_arguments(kernel, (1 << 26) // n, device, rng)
            wide = time_us(kernel, target, knobs, args, device)
            try:
                with _int32_indices():
                    narrow = time_us(kernel, target, knobs, args, device)
            except Exception as err:  # noqa: BLE001 (TVM 0.27 cannot lower int32 cp.async copies, prefetch)
                result[kernel.name] = {"int64_us": round(wide, 1), "int32_error": str(err).strip().splitlines()[-1]}
                continue
            result[kernel.name] = {
                "int64_us": round(wide, 1),
                "int32_us": round(narrow, 1),
                "int32_speedup": round(wide / narrow, 3),
            }
    return result


CHECKS = {"big": big, "determinism": determinism, "index": index}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in sys.argv[2:] or list(CHECKS):
        try:
            result = CHECKS[name](out)
        except Exception as err:  # noqa: BLE001 (report and go on to the next check)
            result = {"error": f"{type(err).__name__}: {err}"}
        (out / f"reliability-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(name, json.dumps(result), flush=True)
