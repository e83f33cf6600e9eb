"""Load an exported lntune library and call its kernels on numpy arrays, torch tensors or TVM tensors.

Needs only the TVM runtime: with TVM_USE_RUNTIME_LIB=1 set before the first `import tvm`, the compiler
library is never loaded (a CUDA library exported with a cubin loads that way; one exported as CUDA
source needs the full TVM, which compiles it with NVRTC at load).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm

LIBRARY = "lntune.so"
MANIFEST = "manifest.json"
STATS_DTYPE = "float32"
_DEVICE_BACKENDS = {"cuda": "libtvm_runtime_cuda.so", "rocm": "libtvm_runtime_rocm.so"}


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _register_device_backend(family: str) -> None:
    """In runtime-only TVM no device backend is auto-loaded; load the library that registers it."""
    if family not in _DEVICE_BACKENDS or not tvm.base._RUNTIME_ONLY:
        return
    path = Path(tvm.__file__).parent / "lib" / _DEVICE_BACKENDS[family]
    if path.exists():
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


class _Kind:
    """How a caller's arrays are handled: numpy (copied to/from the device) or DLPack tensors (zero-copy)."""

    def __init__(self, sample: Any) -> None:
        module = type(sample).__module__
        self.is_numpy = isinstance(sample, np.ndarray)
        self.is_torch = module.startswith("torch")
        if not (self.is_numpy or self.is_torch or isinstance(sample, tvm.runtime.Tensor)):
            raise TypeError(f"expected numpy arrays, torch tensors or tvm tensors, got {type(sample).__name__}")


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype: str
    device: str


def _info(name: str, value: Any) -> _Info:
    """Shape, dtype and device of an argument, or a TypeError naming it."""
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
        dtype = "bfloat16" if value.dtype.name == "bfloat16" else value.dtype.name
        return _Info(tuple(value.shape), dtype, "cpu")
    if type(value).__module__.startswith("torch"):
        if not value.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous())")
        return _Info(tuple(value.shape), str(value.dtype).removeprefix("torch."), value.device.type)
    if isinstance(value, tvm.runtime.Tensor):
        device = {1: "cpu", 2: "cuda", 10: "rocm"}.get(value.device.dlpack_device_type(), "other")
        return _Info(tuple(value.shape), str(value.dtype), device)
    raise TypeError(f"{name} must be a numpy array, torch tensor or tvm tensor, got {type(value).__name__}")


class Library:
    """The kernels of one exported library, dispatched by (hidden size, dtype)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest = json.loads((directory / MANIFEST).read_text())
        self.family = self.manifest["device"]
        _register_device_backend(self.family)
        self.module = tvm.runtime.load_module(str(directory / LIBRARY))
        self.device = {"cpu": tvm.cpu, "cuda": tvm.cuda, "rocm": tvm.rocm}[self.family](0)
        self.functions = {(v["op"], v["hidden"], v["dtype"]): v["function"] for v in self.manifest["variants"]}
        self.parts = {(v["hidden"], v["dtype"]): v["parts"] for v in self.manifest["variants"] if v["op"] == "backward"}
        self.variants = sorted({(h, d) for (_, h, d) in self.functions})
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"lntune.Library({str(self.directory)!r}, target={self.manifest['target']}, variants={self.variants})"

    # -- validation -------------------------------------------------------------------------------
    def _row_input(self, name: str, value: Any) -> _Info:
        info = _info(name, value)
        if len(info.shape) != 2:
            raise ValueError(f"{name} must be 2-D [rows, hidden], got shape {info.shape}")
        hidden, dtype = info.shape[1], info.dtype
        if (hidden, dtype) not in self.variants:
            raise ValueError(
                f"{name}: no variant for hidden={hidden}, dtype={dtype} in this library; it has {self.variants}"
            )
        # numpy arrays are copied to the library's device; tensors must already be there (zero-copy).
        if info.device != self.family and not isinstance(value, np.ndarray):
            raise ValueError(f"{name} is on {info.device}, but this library runs on {self.family}")
        return info

    def _expect(self, name: str, value: Any, shape: tuple[int, ...], dtype: str, ref: _Info) -> None:
        info = _info(name, value)
        if info.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {info.shape}")
        if info.dtype != dtype:
            raise ValueError(f"{name} must have dtype {dtype}, got {info.dtype}")
        if info.device != ref.device or type(value).__module__.split(".")[0] != self._kind_name:
            raise ValueError(f"{name} must be the same kind of array on the same device as the first input")

    @staticmethod
    def _eps(eps: float) -> float:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        return float(eps)

    # -- memory -----------------------------------------------------------------------------------
    def _begin(self, first: Any) -> _Kind:
        kind = _Kind(first)
        self._kind_name = type(first).__module__.split(".")[0]
        return kind

    def _to_device(self, kind: _Kind, value: Any):
        return tvm.runtime.tensor(value, self.device) if kind.is_numpy else value

    def _empty(self, kind: _Kind, like: Any, shape: tuple[int, ...], dtype: str):
        if kind.is_torch:
            import torch

            return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
        return tvm.runtime.empty(shape, dtype, self.device)

    def _back(self, kind: _Kind, value: Any):
        return value.numpy() if kind.is_numpy else value

    @staticmethod
    def _stream(kind: _Kind, sample: Any):
        """Launch on torch's current CUDA stream when given CUDA torch tensors (else a no-op context)."""
        if kind.is_torch and sample.device.type == "cuda":
            import tvm_ffi

            return tvm_ffi.use_torch_stream()
        return contextlib.nullcontext()

    def kernel(self, op: str, hidden: int, dtype: str):
        """The raw compiled function of one kernel (arguments as in te_ops, outputs last)."""
        return self._function(op, hidden, dtype)

    def _function(self, op: str, hidden: int, dtype: str):
        name = self.functions[(op, hidden, dtype)]
        if name not in self._cache:
            self._cache[name] = self.module[name]
        return self._cache[name]

    # -- the API ----------------------------------------------------------------------------------
    def forward(self, x, gamma, beta, eps: float = 1e-5):
        """y, mean, rstd of LayerNorm over the last axis of x[M, N]."""
        kind = self._begin(x)
        info = self._row_input("x", x)
        eps = self._eps(eps)
        rows, hidden = info.shape
        for name, value in (("gamma", gamma), ("beta", beta)):
            self._expect(name, value, (hidden,), info.dtype, info)
        y = self._empty(kind, x, (rows, hidden), info.dtype)
        mean = self._empty(kind, x, (rows,), STATS_DTYPE)
        rstd = self._empty(kind, x, (rows,), STATS_DTYPE)
        if rows:
            args = [self._to_device(kind, a) for a in (x, gamma, beta)]
            with self._stream(kind, x):
                self._function("forward", hidden, info.dtype)(*args, eps, y, mean, rstd)
        return tuple(self._back(kind, t) for t in (y, mean, rstd))

    def forward_stats(self, x, eps: float = 1e-5):
        """mean, rstd of each row of x[M, N]."""
        kind = self._begin(x)
        info = self._row_input("x", x)
        eps = self._eps(eps)
        rows, hidden = info.shape
        mean = self._empty(kind, x, (rows,), STATS_DTYPE)
        rstd = self._empty(kind, x, (rows,), STATS_DTYPE)
        if rows:
            with self._stream(kind, x):
                self._function("forward_stats", hidden, info.dtype)(self._to_device(kind, x), eps, mean, rstd)
        return tuple(self._back(kind, t) for t in (mean, rstd))

    def backward(self, dy, x, mean, rstd, gamma):
        """dx, dgamma, dbeta given dy and the forward's x, mean, rstd and gamma."""
        kind = self._begin(dy)
        info = self._row_input("dy", dy)
        rows, hidden = info.shape
        self._expect("x", x, info.shape, info.dtype, info)
        for name, value in (("mean", mean), ("rstd", rstd)):
            self._expect(name, value, (rows,), STATS_DTYPE, info)
        self._expect("gamma", gamma, (hidden,), info.dtype, info)
        dx = self._empty(kind, dy, (rows, hidden), info.dtype)
        dgamma = self._empty(kind, dy, (hidden,), info.dtype)
        dbeta = self._empty(kind, dy, (hidden,), info.dtype)
        # The fp32 partials live on the device. With torch tensors they come from torch's caching
        # allocator, ordered on its current stream: tvm.runtime.empty is a cudaMalloc, and freeing it
        # a cudaFree, which waits for the whole device, in every training step's backward.
        count = self.parts[(hidden, info.dtype)]
        parts = [self._empty(kind, dy, (count, hidden), STATS_DTYPE) for _ in range(2)]
        args = [self._to_device(kind, a) for a in (dy, x, mean, rstd, gamma)]
        with self._stream(kind, dy):
            if rows:
                self._function("backward", hidden, info.dtype)(*args, dx, *parts)
            else:  # no rows: the sum still runs, over P rows of zeros
                for p in parts:
                    if kind.is_torch:
                        p.zero_()
                    else:
                        p.copyfrom(np.zeros((count, hidden), STATS_DTYPE))
            self._function("backward_sum", hidden, info.dtype)(*parts, dgamma, dbeta)
        return tuple(self._back(kind, t) for t in (dx, dgamma, dbeta))


def load(path: str | Path) -> Library:
    """Load an export directory, or the lntune.so inside one (manifest.json must sit beside it)."""
    path = Path(path)
    directory = path.parent if path.suffix == ".so" else path
    if not (directory / MANIFEST).exists() or not (directory / LIBRARY).exists():
        raise FileNotFoundError(f"{directory} holds no {LIBRARY} + {MANIFEST} (run `lntune export` first)")
    return Library(directory)
