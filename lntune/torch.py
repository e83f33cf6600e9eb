"""PyTorch drop-in: `LayerNorm`, `layer_norm` and `patch(model)` on lntune's kernels.

Two paths reach the same compiled kernels:
- eager: a `torch.autograd.Function` calls the runner's cached launch plans directly (no dispatcher,
  no custom-op Python layer, which cost more than the kernels: docs/performance.md, section 14);
- torch.compile: the operators `lntune::forward` / `lntune::backward`, defined with torch.library
  (fake kernels for shape propagation, an autograd formula and an autocast rule), which the graph
  holds as opaque calls; M stays symbolic, so varying batch or sequence lengths do not recompile
  once dynamo has marked M dynamic.

Libraries: `library=` pins an export directory (or a loaded lntune.Library). Without it, every
(device, hidden size, dtypes) variant comes from lntune's per-user cache (lntune.cache), exported
on first use from the tuning databases shipped with lntune.

Dtypes: x and the parameters of one dtype, or 16-bit x with float32 parameters (AMP master
weights; y and dx in x's dtype, dweight and dbias in float32). Under CUDA autocast, layer_norm runs
in float32 as torch's does (autocast casts its inputs to float32); CPU autocast leaves it alone.
"""

from __future__ import annotations

import math
import numbers
import operator
import platform
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lntune.scalars import check_eps

if TYPE_CHECKING:
    from lntune.runner import Library

AUTO = "auto"  # the library key that means "lntune's per-user cache"
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_SIXTEEN_BIT = ("float16", "bfloat16")
# Device types whose autocast runs layer_norm in float32 (torch's CUDA autocast lists layer_norm
# among its fp32 ops; CPU autocast does not touch it: checked against torch in the tests).
_AUTOCAST_FP32 = ("cuda",)

_PINNED: dict[str, Library] = {}  # resolved export directory -> its library
_CHOSEN: dict[tuple, Library] = {}  # (key, device, hidden, dtype, param dtype) -> library
_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_WHY: dict[tuple, str] = {}  # _unsupported's answers  # ones/zeros for elementwise_affine=False


# -- which library ---------------------------------------------------------------------------------
def _load(path: str) -> Library:
    from lntune.runner import load

    if path not in _PINNED:
        _PINNED[path] = load(path)
    return _PINNED[path]


@torch.compiler.assume_constant_result
def _key(library: str | Path | Library | None) -> str:
    """The library key passed to the custom ops: AUTO, or a pinned export's resolved directory
    (loaded on first use); constant under torch.compile."""
    if library is None or library == AUTO:
        return AUTO
    if isinstance(library, str) and library in _PINNED:
        return library
    if not isinstance(library, (str, Path)):  # a loaded Library
        key = str(library.directory)
        _PINNED.setdefault(key, library)
        return key
    key = str(Path(library).expanduser().resolve())
    _load(key)
    return key


def _target_for(device: torch.device) -> tuple[str, str]:
    """(lntune target, device label for the cache) of a torch device, or a ValueError saying why not."""
    from schedules.targets import TARGETS

    if device.type == "cpu":
        return "llvm", f"cpu-{platform.machine()}"
    if device.type != "cuda":
        raise ValueError(f"lntune has no kernels for {device.type} tensors (CPU, NVIDIA and AMD GPUs only)")
    name = torch.cuda.get_device_name(device)
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        target = f"rocm-{arch}"
    else:
        major, minor = torch.cuda.get_device_capability(device)
        # A cubin runs on later minor versions of its major architecture, not on the next major.
        target = {8: "cuda-sm80", 9: "cuda-sm90"}.get(major, f"cuda-sm{major}{minor}")
        name = f"{name}-sm{major}{minor}"
    if target not in TARGETS:
        raise ValueError(f"lntune has no target for {name} (would be {target}); it has {sorted(TARGETS)}")
    return target, name


def _library(key: str, device: torch.device, hidden: int, dtype: str, param_dtype: str) -> Library:
    """The library that runs this variant: the pinned one, or the cache's (built on first use)."""
    chosen = _CHOSEN.get((key, device, hidden, dtype, param_dtype))
    if chosen is not None:
        return chosen
    if key == AUTO:
        from lntune import cache
        from lntune.runner import dtype_spec

        target, label = _target_for(device)
        lib = cache.library(target, label, hidden, dtype_spec(dtype, param_dtype))
    else:
        lib = _load(key)
    _CHOSEN[(key, device, hidden, dtype, param_dtype)] = lib
    return lib


def library_for(
    device: torch.device | str,
    hidden: int,
    dtype: torch.dtype,
    param_dtype: torch.dtype | None = None,
    library: str | Path | Library | None = None,
) -> Library:
    """The lntune.Library that runs layer_norm for this device, hidden size and dtypes (the pinned
    `library`, or lntune's cache, exporting the variant on first use)."""
    device = torch.device(device)
    dtype_name = _DTYPES.get(dtype, str(dtype))
    param_name = _DTYPES.get(param_dtype, str(param_dtype)) if param_dtype is not None else dtype_name
    key = _key(library)
    why = _unsupported(key, device.type, device.index or 0, hidden, dtype_name, param_name)
    if why:
        raise ValueError(f"lntune cannot run this layer_norm: {why}")
    return _library(key, device, hidden, dtype_name, param_name)


@torch.compiler.assume_constant_result
def _unsupported(key: str, device_type: str, device_index: int, hidden: int, dtype: str, param_dtype: str) -> str:
    """Why lntune cannot run this variant ("" when it can); constant under torch.compile, and
    remembered (eager calls ask it every time)."""
    args = (key, device_type, device_index, hidden, dtype, param_dtype)
    why = _WHY.get(args)
    if why is None:
        why = _WHY[args] = _reason(*args)
    return why


def _reason(key: str, device_type: str, device_index: int, hidden: int, dtype: str, param_dtype: str) -> str:
    if dtype not in _DTYPES.values() or param_dtype not in _DTYPES.values():
        return f"dtype {dtype} with parameters in {param_dtype}: lntune has float32, float16, bfloat16"
    if param_dtype != dtype and not (dtype in _SIXTEEN_BIT and param_dtype == "float32"):
        return f"{dtype} input with {param_dtype} parameters: lntune mixes only 16-bit input with float32 parameters"
    if key == AUTO:
        try:
            _target_for(torch.device(device_type, device_index))
        except ValueError as err:
            return str(err)
        return ""
    lib = _load(key)
    family = "cuda" if device_type == "cuda" and not torch.version.hip else "rocm" if device_type == "cuda" else "cpu"
    if lib.family != family:
        return f"the lntune library {key} runs on {lib.family}, the input is on {device_type}"
    if not lib.has_variant(hidden, dtype, param_dtype):
        from lntune.runner import dtype_spec

        wanted = dtype_spec(dtype, param_dtype)
        return f"the lntune library {key} has no variant for hidden={hidden}, {wanted}; it has {lib.names()}"
    return ""


# -- the operators torch.compile sees --------------------------------------------------------------
_OPS = torch.library.Library("lntune", "DEF")
_OPS.define("forward(Tensor x, Tensor weight, Tensor bias, float eps, str library) -> (Tensor, Tensor, Tensor)")
_OPS.define(
    "backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor weight, str library) -> (Tensor, Tensor, Tensor)"
)


def _names(x: torch.Tensor, weight: torch.Tensor) -> tuple[str, str]:
    return _DTYPES.get(x.dtype, str(x.dtype)), _DTYPES.get(weight.dtype, str(weight.dtype))


def _forward_op(x, weight, bias, eps, library):
    dtype, param = _names(x, weight)
    return _library(library, x.device, x.shape[-1], dtype, param).forward(x, weight, bias, eps)


def _backward_op(dy, x, mean, rstd, weight, library):
    dtype, param = _names(x, weight)
    return _library(library, x.device, x.shape[-1], dtype, param).backward(dy, x, mean, rstd, weight)


_OPS.impl("forward", _forward_op, "CompositeExplicitAutograd")
_OPS.impl("backward", _backward_op, "CompositeExplicitAutograd")


@torch.library.register_fake("lntune::forward")
def _(x, weight, bias, eps, library):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.register_fake("lntune::backward")
def _(dy, x, mean, rstd, weight, library):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _bias, _eps, library = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight)
    ctx.library = library


def _op_backward(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.lntune.backward(dy, x, mean, rstd, weight, ctx.library)
    return dx, dweight, dbias, None, None


torch.library.register_autograd("lntune::forward", _op_backward, setup_context=_setup_context)
for _device_type in _AUTOCAST_FP32:
    torch.library.register_autocast("lntune::forward", _device_type, torch.float32)


# -- the eager path --------------------------------------------------------------------------------
class _LayerNormFunction(torch.autograd.Function):
    """Eager autograd straight to the runner (mean and rstd stay saved for the backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, lib, affine):
        y, mean, rstd = lib.forward(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.lib, ctx.affine = lib, affine
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, weight = ctx.saved_tensors
        dx, dweight, dbias = ctx.lib.backward(dy, x, mean, rstd, weight)
        if not ctx.affine:
            dweight = dbias = None
        return dx, dweight, dbias, None, None, None


def _hidden(x: torch.Tensor, normalized_shape) -> tuple[int, ...]:
    """normalized_shape as a tuple of ints (numpy integers too), checked against x's trailing axes.
    (No try/except TypeError: dynamo in torch 2.11 turns that TypeError into an internal error.)"""
    if type(normalized_shape) is tuple and all(type(d) is int for d in normalized_shape):
        shape = normalized_shape  # the common case (a module's), without the slow ABC checks below
    elif isinstance(normalized_shape, numbers.Integral):
        shape = (operator.index(normalized_shape),)
    elif isinstance(normalized_shape, (tuple, list, torch.Size)) and all(
        isinstance(d, numbers.Integral) for d in normalized_shape
    ):
        shape = tuple(operator.index(d) for d in normalized_shape)
    else:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    if not shape or tuple(x.shape[-len(shape) :]) != shape:
        raise ValueError(
            f"normalized_shape {shape} must match the trailing dimensions of input of shape {tuple(x.shape)}"
        )
    return shape


def _constants(x: torch.Tensor, hidden: int, param: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ones and zeros standing in for absent weight and bias (cached: allocating them costs a call)."""
    key = (x.device, hidden, param)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = (
            torch.ones(hidden, dtype=param, device=x.device),
            torch.zeros(hidden, dtype=param, device=x.device),
        )
    return _CONSTANTS[key]


def layer_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    library: str | Path | Library | None = None,
    fallback: bool = False,
) -> torch.Tensor:
    """torch.nn.functional.layer_norm through lntune's kernels.

    A variant lntune cannot run (a dtype it has no kernels for, a device without a target, a pinned
    library without it) raises ValueError, or with fallback=True warns and uses torch's kernels.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    shape = _hidden(input, normalized_shape)
    hidden = math.prod(shape)
    x, weight, bias = _autocast(input, weight, bias)
    param_type = weight.dtype if weight is not None else bias.dtype if bias is not None else x.dtype
    dtype, param = _DTYPES.get(x.dtype, str(x.dtype)), _DTYPES.get(param_type, str(param_type))
    key = _key(library)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        why = f"weight in {weight.dtype} but bias in {bias.dtype}: lntune takes both in one dtype"
    else:
        why = _unsupported(key, x.device.type, x.device.index or 0, hidden, dtype, param)
    if why:
        if not fallback:
            raise ValueError(f"lntune cannot run this layer_norm: {why} (pass fallback=True to use torch's kernels)")
        warnings.warn(f"lntune: {why}; using torch's layer_norm", stacklevel=2)
        return nn.functional.layer_norm(input, shape, weight, bias, eps)
    affine = weight is not None or bias is not None
    ones, zeros = (None, None) if (weight is not None and bias is not None) else _constants(x, hidden, param_type)
    w = (weight if weight.dim() == 1 else weight.reshape(hidden)) if weight is not None else ones
    b = (bias if bias.dim() == 1 else bias.reshape(hidden)) if bias is not None else zeros
    rows = x.reshape(-1, hidden)
    if torch.compiler.is_compiling():
        y = torch.ops.lntune.forward(rows, w, b, float(eps), key)[0]
    else:
        lib = _library(key, x.device, hidden, dtype, param)
        eps = check_eps(eps)
        if torch.is_grad_enabled() and (rows.requires_grad or w.requires_grad or b.requires_grad):
            y = _LayerNormFunction.apply(rows, w, b, eps, lib, affine)
        else:
            y = lib.forward(rows, w, b, eps)[0]
    return y.view(x.shape)


def _autocast(x: torch.Tensor, weight, bias):
    """What autocast would hand torch's layer_norm: float32 inputs on devices whose autocast lists it
    as a float32 op, the inputs unchanged elsewhere."""
    device_type = x.device.type
    if device_type not in _AUTOCAST_FP32 or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    f32 = torch.float32
    return tuple(None if t is None else t.to(f32) for t in (x, weight, bias))


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm with lntune's kernels: the same arguments and parameters (`weight`, `bias`),
    plus `library` (an export directory or a loaded lntune.Library; default: lntune's cache) and
    `fallback` (use torch's kernels, with a warning, where lntune has none)."""

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        library: str | Path | Library | None = None,
        fallback: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(operator.index(d) for d in normalized_shape)
        self.eps = check_eps(eps)
        self.elementwise_affine = elementwise_affine
        self.library = _key(library)
        self.fallback = fallback
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_torch(cls, module: nn.LayerNorm, *, library=None, fallback: bool = False) -> LayerNorm:
        """An lntune LayerNorm holding `module`'s own parameters (the same Parameter objects, so an
        optimizer built on the model keeps updating them)."""
        ours = cls.__new__(cls)
        nn.Module.__init__(ours)
        ours.normalized_shape = tuple(module.normalized_shape)
        ours.eps = check_eps(module.eps)
        ours.elementwise_affine = module.elementwise_affine
        ours.library = _key(library)
        ours.fallback = fallback
        ours.weight = module.weight
        ours.bias = module.bias
        ours.train(module.training)
        return ours

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(
            input,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            library=self.library,
            fallback=self.fallback,
        )

    def extra_repr(self) -> str:
        where = "" if self.library == AUTO else f", library={self.library}"
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}{where}"


def patch(model: nn.Module, *, library: str | Path | Library | None = None, fallback: bool = True) -> nn.Module:
    """Replace every torch.nn.LayerNorm in `model` (exactly that class, not subclasses, whose forward
    may differ) by lntune's, in place, keeping its parameters; returns the model (or, if the model
    is itself a LayerNorm, its replacement). fallback=True: a layer whose dtype or device lntune has
    no kernels for keeps torch's behaviour, with a warning."""
    if type(model) is nn.LayerNorm:
        return LayerNorm.from_torch(model, library=library, fallback=fallback)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm:
                setattr(parent, name, LayerNorm.from_torch(child, library=library, fallback=fallback))
    return model


__all__ = ["AUTO", "LayerNorm", "layer_norm", "library_for", "patch"]
