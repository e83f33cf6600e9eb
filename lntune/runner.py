"""Load an exported lntune library and call its kernels on numpy arrays, torch tensors or TVM tensors.

Needs only the TVM runtime: with TVM_USE_RUNTIME_LIB=1 set before the first `import tvm`, the compiler
library is never loaded (a CUDA library exported with a cubin loads that way; one exported as CUDA
source needs the full TVM, which compiles it with NVRTC at load).

Torch tensors take a short path: the checks of a call depend only on the arguments' shapes, dtypes and
devices, so their outcome (a launch plan: the functions to call, P, the output dtypes) is cached under
exactly those, and a repeated call costs a dictionary lookup, the output allocations and the launch.
tvm-ffi launches on torch's current stream of the tensors' device by itself.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from lntune import files
from lntune.scalars import check_eps

LIBRARY = files.LIBRARY
MANIFEST = files.MANIFEST
STATS_DTYPE = "float32"
_DEVICE_BACKENDS = {"cuda": "libtvm_runtime_cuda.so", "rocm": "libtvm_runtime_rocm.so"}
# The byte alignment the kernels assume of every tensor: the GPU kernels use 16-byte vector loads,
# stores and cp.async; LLVM's CPU code may use aligned vector instructions (a float32 view 4 bytes off
# faulted). A tensor that is not aligned (or not contiguous) is copied first, never passed.
ALIGNMENT = {"cpu": 64, "cuda": 16, "rocm": 16}
_MAX_PLANS = 4096
# Output buffers that share one allocation start at multiples of this many bytes.
_PAD_BYTES = 64
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_TVM_DEVICES = {1: "cpu", 2: "cuda", 10: "rocm"}


def numpy_dtype(name: str):
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


def _check_host_cpu(manifest: dict, path: Path) -> None:
    """An llvm library holds code for the CPU it was exported for (its vector instructions): on
    another CPU it could die of an illegal instruction, so it is refused by name. Checked where the
    TVM compiler is loaded (it names this host's CPU); the runtime-only TVM cannot tell."""
    built_for = manifest.get("target_spec", {}).get("mcpu")
    system_cpu = tvm.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
    if built_for and system_cpu is not None and built_for != system_cpu():
        raise files.LibraryError(
            f"{path}: this llvm library was exported for CPU {built_for}, this host is {system_cpu()}; "
            "export it again here (lntune export --target llvm)"
        )


def _torch():
    """The torch module if the process imported it (a torch tensor cannot exist otherwise)."""
    return sys.modules.get("torch")


def _is_torch(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _torch_dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_spec(dtype: str, param_dtype: str | None = None) -> str:
    """A variant's dtypes as export spells them: "bfloat16", or "bfloat16:float32" for float32
    parameters (te_ops.layer_norm.dtype_spec, which needs the TVM compiler; the runner must not)."""
    return dtype if param_dtype in (None, dtype) else f"{dtype}:{param_dtype}"


def _padded(count: int, itemsize: int) -> int:
    """count rounded up so that what follows it in a shared allocation stays _PAD_BYTES-aligned."""
    step = max(1, _PAD_BYTES // itemsize)
    return -(-count // step) * step


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype: str
    device: str


def _info(name: str, value: Any) -> _Info:
    """Shape, dtype and device of an argument, or a TypeError naming it."""
    if isinstance(value, np.ndarray):
        dtype = "bfloat16" if value.dtype.name == "bfloat16" else value.dtype.name
        return _Info(tuple(value.shape), dtype, "cpu")
    if _is_torch(value):
        return _Info(tuple(value.shape), _torch_dtype_name(value.dtype), str(value.device))
    if isinstance(value, tvm.runtime.Tensor):
        device = _TVM_DEVICES.get(value.device.dlpack_device_type(), "other")
        device = device if device == "cpu" else f"{device}:{value.device.index}"
        return _Info(tuple(value.shape), str(value.dtype), device)
    raise TypeError(
        f"{name} must be a numpy array, torch tensor or tvm tensor (all of one kind), got {type(value).__name__}"
    )


@dataclass(frozen=True)
class _Plan:
    """What one checked call needs: the functions to launch and the sizes of what it allocates."""

    rows: int
    hidden: int
    dtype: str
    param_dtype: str
    main: Any
    sum: Any = None
    parts: int = 0
    device_index: int = -1  # a CUDA tensor's device (TVM launches on the current device)


def _ready(t, alignment: int):
    """t itself when the kernels may read it in place, else a contiguous, aligned copy."""
    if t.is_contiguous() and t.data_ptr() % alignment == 0:
        return t
    return t.clone(memory_format=_torch().contiguous_format)


class TorchLaunch:
    """Forward and backward of one checked (rows M, hidden N, dtypes, device) on torch tensors: the
    functions to call and templates that allocate the outputs in one call each. Callers have
    checked their arguments' shapes, dtypes and devices (Library's torch path, by its plan keys;
    lntune.torch, once per input shape); x, dy and the outputs may have any shape of M*N elements."""

    __slots__ = (
        "rows",
        "hidden",
        "alignment",
        "device_index",
        "_forward",
        "_stats",
        "_backward",
        "_sum",
        "_stats_like",
        "_parts_like",
    )

    def __init__(self, lib: Library, plan: _Plan, like) -> None:
        torch = _torch()
        self.rows, self.hidden, self.alignment = plan.rows, plan.hidden, lib.alignment
        self.device_index = plan.device_index
        self._forward = lib.kernel("forward", plan.hidden, plan.dtype, plan.param_dtype)
        self._stats = lib.kernel("forward_stats", plan.hidden, plan.dtype)
        self._backward = lib.kernel("backward", plan.hidden, plan.dtype, plan.param_dtype)
        self._sum = lib.kernel("backward_sum", plan.hidden, plan.dtype, plan.param_dtype)
        parts = lib.parts_for(plan.hidden, plan.dtype, plan.param_dtype)
        # Expanded scalars hold no memory; empty_like of one is a new contiguous tensor of its shape.
        one = torch.empty((), dtype=torch.float32, device=like.device)
        self._stats_like = one.expand(plan.rows)
        # The two fp32 [P, N] partial buffers of a backward, from torch's caching allocator ordered
        # on its current stream (a TVM allocation is a cudaMalloc/cudaFree pair, the free waiting
        # for the whole device). P * N * 4 bytes is a multiple of 64 at every P and N exported.
        self._parts_like = one.expand(2, parts, plan.hidden)

    def launch(self, function, *args) -> None:
        if self.device_index < 0:
            return function(*args)
        torch = _torch()
        if torch.cuda.current_device() == self.device_index:
            return function(*args)
        with torch.cuda.device(self.device_index):  # TVM launches on the current device
            return function(*args)

    def _rows(self, t):
        """t as the [M, N] the kernels take, contiguous and aligned (a view where it can be)."""
        if t.dim() != 2:
            t = t.reshape(self.rows, self.hidden)
        return _ready(t, self.alignment)

    def forward_stats(self, x, eps: float):
        """mean and rstd of each row of x."""
        like = self._stats_like
        mean, rstd = _torch().empty_like(like), _torch().empty_like(like)
        if self.rows:
            self.launch(self._stats, self._rows(x), eps, mean, rstd)
        return mean, rstd

    def forward(self, x, gamma, beta, eps: float):
        """y (x's shape, contiguous), mean and rstd."""
        torch = _torch()
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        like = self._stats_like
        mean, rstd = torch.empty_like(like), torch.empty_like(like)
        if self.rows:
            self.launch(
                self._forward,
                self._rows(x),
                _param(gamma, self.hidden, self.alignment),
                _param(beta, self.hidden, self.alignment),
                eps,
                y if y.dim() == 2 else y.view(self.rows, self.hidden),
                mean,
                rstd,
            )
        return y, mean, rstd

    def backward(self, dy, x, mean, rstd, gamma):
        """dx (dy's shape, contiguous), dgamma and dbeta (gamma's shape and dtype)."""
        torch = _torch()
        dx = torch.empty_like(dy, memory_format=torch.contiguous_format)
        contiguous = torch.contiguous_format
        dgamma = torch.empty_like(gamma, memory_format=contiguous)
        dbeta = torch.empty_like(gamma, memory_format=contiguous)
        if not self.rows:
            return dx, dgamma.zero_(), dbeta.zero_()
        parts = torch.empty_like(self._parts_like).unbind(0)
        align = self.alignment
        self.launch(
            self._backward,
            self._rows(dy),
            self._rows(x),
            _ready(mean, align),
            _ready(rstd, align),
            _param(gamma, self.hidden, align),
            dx if dx.dim() == 2 else dx.view(self.rows, self.hidden),
            *parts,
        )
        if dgamma.dim() == 1:
            self.launch(self._sum, *parts, dgamma, dbeta)
        else:
            self.launch(self._sum, *parts, dgamma.view(self.hidden), dbeta.view(self.hidden))
        return dx, dgamma, dbeta


def _param(t, hidden: int, alignment: int):
    """A parameter (or its gradient) as the [N] the kernels take."""
    if t.dim() != 1:
        t = t.view(hidden) if t.is_contiguous() else t.reshape(hidden)
    return _ready(t, alignment)


class Library:
    """The kernels of one exported library, dispatched by (hidden size, dtype, parameters' dtype)."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory = directory
        self.manifest = manifest
        self.family = manifest["device"]
        _register_device_backend(self.family)
        if self.family == "cpu":
            _check_host_cpu(manifest, directory / MANIFEST)
            from schedules.host import ensure_thread_pool

            ensure_thread_pool()  # TVM's default is half the machine's CPUs, whatever the process is granted
        # Through loadable_path: dlopen would hand back an earlier export at the same path.
        self.module = tvm.runtime.load_module(files.loadable_path(directory / LIBRARY))
        files.check_functions(manifest, self.module, directory / MANIFEST)
        self.device = {"cpu": tvm.cpu, "cuda": tvm.cuda, "rocm": tvm.rocm}[self.family](0)
        self.alignment = ALIGNMENT[self.family]
        self.functions: dict[tuple[str, int, str, str], str] = {}
        self.parts: dict[tuple[int, str, str], int] = {}
        for v in manifest["variants"]:
            key = (v["op"], v["hidden"], v["dtype"], v.get("param_dtype", v["dtype"]))
            self.functions[key] = v["function"]
            if v["op"] == "backward":
                self.parts[key[1:]] = v["parts"]
        # forward_stats has no parameters: any entry of the activations' dtype serves every variant.
        self._stats = {(h, d): name for (op, h, d, _), name in self.functions.items() if op == "forward_stats"}
        self.variants: list[tuple[int, str, str]] = sorted(
            (h, d, p) for (op, h, d, p) in self.functions if op == "forward"
        )
        self._variant_set = set(self.variants)
        self._cache: dict[str, Any] = {}
        self._plans: dict[tuple, TorchLaunch] = {}
        self._launchers: dict[tuple, TorchLaunch] = {}

    def __repr__(self) -> str:
        return f"lntune.Library({str(self.directory)!r}, target={self.manifest['target']}, variants=[{self.names()}])"

    def names(self) -> str:
        """The variants as "hidden:dtypes", comma-separated (for messages)."""
        return ", ".join(f"{h}:{dtype_spec(d, p)}" for h, d, p in self.variants)

    def has_variant(self, hidden: int, dtype: str, param_dtype: str | None = None) -> bool:
        return (hidden, dtype, param_dtype or dtype) in self._variant_set

    def kernel(self, op: str, hidden: int, dtype: str, param_dtype: str | None = None):
        """The raw compiled function of one kernel (arguments as in te_ops, outputs last)."""
        if op == "forward_stats":
            name = self._stats[(hidden, dtype)]
        else:
            name = self.functions[(op, hidden, dtype, param_dtype or dtype)]
        if name not in self._cache:
            self._cache[name] = self.module[name]
        return self._cache[name]

    def parts_for(self, hidden: int, dtype: str, param_dtype: str | None = None) -> int:
        """P, the number of fp32 partial rows the backward of this variant writes."""
        return self.parts[(hidden, dtype, param_dtype or dtype)]

    # -- checks (made once per plan) ----------------------------------------------------------------
    def _device_of(self, infos: dict[str, _Info], numpy_in: bool) -> int:
        """The CUDA/ROCm device index all arguments share, after checking they do (-1 on CPU)."""
        first_name, first = next(iter(infos.items()))
        for name, info in infos.items():
            if info.device != first.device:
                raise ValueError(f"{name} is on {info.device}, but {first_name} is on {first.device}")
        family = first.device.split(":")[0]
        if family != self.family and not numpy_in:  # numpy arrays are copied to the library's device
            raise ValueError(f"{first_name} is on {first.device}, but this library runs on {self.family}")
        if family == "cpu" or ":" not in first.device:
            return -1
        torch = _torch()
        if torch is not None and family == "cuda" and torch.cuda.device_count() == 1:
            return -1  # one visible GPU: it is the current device
        return int(first.device.split(":")[1])

    def _variant(self, name: str, info: _Info, param: _Info | None) -> tuple[int, int, str]:
        """(rows, hidden, parameters' dtype) of the variant a call runs: the parameters' dtype picks a
        mixed variant (float32 gamma beside 16-bit rows) where the library has one."""
        if len(info.shape) != 2:
            raise ValueError(f"{name} must be 2-D [rows, hidden], got shape {info.shape}")
        rows, hidden = info.shape
        if param is not None and (hidden, info.dtype, param.dtype) in self._variant_set:
            return rows, hidden, param.dtype
        if (hidden, info.dtype, info.dtype) in self._variant_set:
            return rows, hidden, info.dtype
        raise ValueError(
            f"{name}: no variant for hidden={hidden}, dtype={info.dtype} in this library; it has {self.names()}"
        )

    @staticmethod
    def _expect(name: str, info: _Info, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
        if info.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {info.shape}")
        if info.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype {' or '.join(dtypes)}, got {info.dtype}")

    def _plan(self, op: str, args: dict[str, Any]) -> _Plan:
        """Check one call's arguments (shapes, dtypes, devices) and say what to launch."""
        infos = {name: _info(name, value) for name, value in args.items()}
        kinds = {type(v).__module__.split(".")[0] for v in args.values()}
        if len(kinds) > 1:
            raise TypeError(f"all arguments must be of one kind (numpy, torch or tvm), got {sorted(kinds)}")
        numpy_in = isinstance(next(iter(args.values())), np.ndarray)
        first = "x" if op.startswith("forward") else "dy"
        rows, hidden, param_dtype = self._variant(first, infos[first], infos.get("gamma"))
        dtype = infos[first].dtype
        if op == "forward":
            for name in ("gamma", "beta"):
                self._expect(name, infos[name], (hidden,), (param_dtype,))
        elif op == "backward":
            if infos["x"].shape != infos["dy"].shape:  # neither is known to be the wrong one
                raise ValueError(f"dy and x must have one shape, got dy {infos['dy'].shape} and x {infos['x'].shape}")
            self._expect("x", infos["x"], (rows, hidden), (dtype,))
            for name in ("mean", "rstd"):
                self._expect(name, infos[name], (rows,), (STATS_DTYPE,))
            self._expect("gamma", infos["gamma"], (hidden,), (param_dtype,))
        device_index = self._device_of(infos, numpy_in)
        if op == "backward":
            return _Plan(
                rows,
                hidden,
                dtype,
                param_dtype,
                self.kernel("backward", hidden, dtype, param_dtype),
                self.kernel("backward_sum", hidden, dtype, param_dtype),
                self.parts_for(hidden, dtype, param_dtype),
                device_index,
            )
        return _Plan(
            rows, hidden, dtype, param_dtype, self.kernel(op, hidden, dtype, param_dtype), None, 0, device_index
        )

    # -- the torch path ------------------------------------------------------------------------------
    # Keys hold each argument's (shape, dtype, device); a failed check stores nothing, so a key that
    # is found was checked. Written out per op: this is the per-call cost that users see.
    def _launch_for(self, key: Callable[[], tuple], op: str, args: dict[str, Any]) -> TorchLaunch:
        """The launcher of a call whose arguments `key` describes, checking them on first sight."""
        try:
            key = key()
        except AttributeError:  # an argument that is no tensor: _plan says which
            self._plan(op, args)
            raise
        launch = self._plans.get(key)
        if launch is None:
            if len(self._plans) >= _MAX_PLANS:  # row counts that vary without end: start over
                self._plans.clear()
                self._launchers.clear()
            launch = self._plans[key] = self._launcher(self._plan(op, args), next(iter(args.values())))
        return launch

    def _launcher(self, plan: _Plan, like) -> TorchLaunch:
        """One launcher per (rows, hidden, dtypes) and device, shared by the ops that run on it."""
        key = (plan.rows, plan.hidden, plan.dtype, plan.param_dtype, like.device)
        launch = self._launchers.get(key)
        if launch is None:
            launch = self._launchers[key] = TorchLaunch(self, plan, like)
        return launch

    def torch_launch(self, x, gamma, beta=None) -> TorchLaunch:
        """The launcher of forward and backward for torch tensors shaped and typed like x[M, N],
        gamma[N] and beta[N] on their device, checked once: lntune.torch keeps one per input shape
        and calls it with no further checks (its arguments must then match what was checked)."""
        args = {"x": x, "gamma": gamma, "beta": gamma if beta is None else beta}
        return self._launch_for(lambda: ("f", *((t.shape, t.dtype, t.device) for t in args.values())), "forward", args)

    def _torch_forward(self, x, gamma, beta, eps: float):
        def key():
            return (
                "f",
                (x.shape, x.dtype, x.device),
                (gamma.shape, gamma.dtype, gamma.device),
                (beta.shape, beta.dtype, beta.device),
            )

        return self._launch_for(key, "forward", {"x": x, "gamma": gamma, "beta": beta}).forward(x, gamma, beta, eps)

    def _torch_forward_stats(self, x, eps: float):
        launch = self._launch_for(lambda: ("s", x.shape, x.dtype, x.device), "forward_stats", {"x": x})
        return launch.forward_stats(x, eps)

    def _torch_backward(self, dy, x, mean, rstd, gamma):
        def key():
            return (
                "b",
                dy.shape,
                dy.dtype,
                dy.device,
                x.shape,
                x.dtype,
                x.device,
                mean.shape,
                mean.dtype,
                mean.device,
                rstd.shape,
                rstd.dtype,
                rstd.device,
                gamma.shape,
                gamma.dtype,
                gamma.device,
            )

        args = {"dy": dy, "x": x, "mean": mean, "rstd": rstd, "gamma": gamma}
        return self._launch_for(key, "backward", args).backward(dy, x, mean, rstd, gamma)

    # -- numpy and TVM tensors -----------------------------------------------------------------------
    def _host_ready(self, value):
        """numpy arrays go to the library's device as TVM tensors (an aligned copy); TVM tensors
        must already be contiguous and aligned there."""
        if isinstance(value, np.ndarray):
            return tvm.runtime.tensor(np.ascontiguousarray(value), self.device)
        if not value.is_contiguous() or value.data_ptr() % self.alignment:
            raise ValueError(f"a tvm tensor must be contiguous and {self.alignment}-byte aligned")
        return value

    def _host_empty(self, shape: tuple[int, ...], dtype: str):
        return tvm.runtime.empty(shape, dtype, self.device)

    @staticmethod
    def _host_back(numpy_in: bool, values):
        return tuple(v.numpy() if numpy_in else v for v in values)

    # -- the API ----------------------------------------------------------------------------------
    def forward(self, x, gamma, beta, eps: float = 1e-5):
        """y, mean, rstd of LayerNorm over the last axis of x[M, N]."""
        eps = check_eps(eps)
        if _is_torch(x):
            return self._torch_forward(x, gamma, beta, eps)
        plan = self._plan("forward", {"x": x, "gamma": gamma, "beta": beta})
        numpy_in = isinstance(x, np.ndarray)
        rows, hidden = plan.rows, plan.hidden
        y = self._host_empty((rows, hidden), plan.dtype)
        mean, rstd = self._host_empty((rows,), STATS_DTYPE), self._host_empty((rows,), STATS_DTYPE)
        if rows:
            inputs = [self._host_ready(v) for v in (x, gamma, beta)]
            plan.main(*inputs, eps, y, mean, rstd)
        return self._host_back(numpy_in, (y, mean, rstd))

    def forward_stats(self, x, eps: float = 1e-5):
        """mean, rstd of each row of x[M, N]."""
        eps = check_eps(eps)
        if _is_torch(x):
            return self._torch_forward_stats(x, eps)
        plan = self._plan("forward_stats", {"x": x})
        mean, rstd = self._host_empty((plan.rows,), STATS_DTYPE), self._host_empty((plan.rows,), STATS_DTYPE)
        if plan.rows:
            plan.main(self._host_ready(x), eps, mean, rstd)
        return self._host_back(isinstance(x, np.ndarray), (mean, rstd))

    def backward(self, dy, x, mean, rstd, gamma):
        """dx, dgamma, dbeta given dy and the forward's x, mean, rstd and gamma."""
        if _is_torch(dy):
            return self._torch_backward(dy, x, mean, rstd, gamma)
        args = {"dy": dy, "x": x, "mean": mean, "rstd": rstd, "gamma": gamma}
        plan = self._plan("backward", args)
        rows, hidden = plan.rows, plan.hidden
        dx = self._host_empty((rows, hidden), plan.dtype)
        dgamma, dbeta = (self._host_empty((hidden,), plan.param_dtype) for _ in range(2))
        parts = [self._host_empty((plan.parts, hidden), STATS_DTYPE) for _ in range(2)]
        if rows:
            plan.main(*(self._host_ready(v) for v in args.values()), dx, *parts)
        else:  # no rows: the sum still runs, over P rows of zeros
            for p in parts:
                p.copyfrom(np.zeros((plan.parts, hidden), STATS_DTYPE))
        plan.sum(*parts, dgamma, dbeta)
        return self._host_back(isinstance(dy, np.ndarray), (dx, dgamma, dbeta))


def load(path: str | Path) -> Library:
    """Load an export directory, or the lntune.so inside one (manifest.json must sit beside it).

    The manifest is checked (its fields, and the library's recorded size and checksum) before the
    library is opened, so a damaged export fails with one message naming the file (files.LibraryError).
    """
    path = Path(path).expanduser()
    if path.suffix == ".so" or path.name == MANIFEST:
        if path.name not in (LIBRARY, MANIFEST):
            raise ValueError(f"{path}: an lntune export is a folder holding {LIBRARY} and {MANIFEST}; pass the folder")
        directory = path.parent
    else:
        directory = path
    if not (directory / MANIFEST).exists() or not (directory / LIBRARY).exists():
        raise FileNotFoundError(f"{directory} holds no {LIBRARY} + {MANIFEST} (run `lntune export` first)")
    return Library(directory, files.read_manifest(directory))
