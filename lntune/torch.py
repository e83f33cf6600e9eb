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
from torch.autograd.function import once_differentiable

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
        # The cache's llvm libraries hold code for this host's CPU (its vector units): keyed by it.
        return "llvm", f"cpu-{platform.machine()}-{TARGETS['llvm'].spec['mcpu']}"
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
    """Eager autograd straight to a checked launcher (lntune.runner.TorchLaunch): x keeps its shape
    (viewed as rows inside, so autograd records no view nodes), mean and rstd stay saved for the
    backward. dy arrives in y's shape, dtype and device (autograd's guarantee), any strides."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, launch):
        y, mean, rstd = launch.forward(x, weight, bias, eps)
        # x and weight are the caller's and may be changed in place before the backward: saved, so
        # autograd notices. mean and rstd are nobody else's: plain attributes cost less to keep.
        ctx.save_for_backward(x, weight)
        ctx.launch, ctx.mean, ctx.rstd = launch, mean, rstd
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: these gradients have no gradients of their own
            return _backward_once_differentiable(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dweight, dbias = ctx.launch.backward(dy, x, ctx.mean, ctx.rstd, weight)
    return dx, dweight, dbias, None, None


# Asked to differentiate them, autograd raises instead of silently taking them as constants.
_backward_once_differentiable = once_differentiable(_backward)


# Function.apply's Python layer only unwraps functorch wrappers; without functorch transforms
# active, its C implementation does the same job for a few us less a call.
_apply_c = super(torch.autograd.function._SingleLevelFunction, _LayerNormFunction).apply


def _apply(x, weight, bias, eps: float, launch):
    if torch._C._are_functorch_transforms_active():
        return _LayerNormFunction.apply(x, weight, bias, eps, launch)
    return _apply_c(x, weight, bias, eps, launch)


class _Eager:
    """What a repeated eager call of one key needs: the launcher, the checked eps, and the ones and
    zeros that stand in for an absent weight or bias."""

    __slots__ = ("launch", "eps", "ones", "zeros")

    def __init__(self, launch, eps: float, ones, zeros) -> None:
        self.launch, self.eps, self.ones, self.zeros = launch, eps, ones, zeros


_EAGER: dict[tuple, _Eager] = {}  # _eager_key -> the checked call
_MAX_EAGER = 4096


def _eager_key(input, normalized_shape, weight, bias, eps, library) -> tuple | None:
    """Everything the checks of an eager call depend on, or None where a call must take the full
    path (tensor subclasses, list shapes, CUDA autocast, torch.compile)."""
    if type(input) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    if type(normalized_shape) not in (int, tuple) or (input.is_cuda and torch.is_autocast_enabled("cuda")):
        return None
    return (
        library,
        normalized_shape,
        eps,
        input.shape,
        input.dtype,
        input.device,
        None if weight is None else (weight.shape, weight.dtype, weight.device),
        None if bias is None else (bias.shape, bias.dtype, bias.device),
    )


def _run(entry: _Eager, input, weight, bias):
    """Run a checked call: through autograd when a gradient is wanted, else the forward alone."""
    weight = entry.ones if weight is None else weight
    bias = entry.zeros if bias is None else bias
    if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or bias.requires_grad):
        return _apply(input, weight, bias, entry.eps, entry.launch)
    return entry.launch.forward(input, weight, bias, entry.eps)[0]


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
    key = _eager_key(input, normalized_shape, weight, bias, eps, library)
    entry = None if key is None else _EAGER.get(key)
    if entry is not None:  # checked before: the per-call cost users see in a training step
        return _run(entry, input, weight, bias)
    return _layer_norm_checked(input, normalized_shape, weight, bias, eps, library, fallback, key)


def _layer_norm_checked(input, normalized_shape, weight, bias, eps, library, fallback: bool, key: tuple | None):
    """layer_norm with every check; the outcome of an eager call is kept under `key`."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    shape = _hidden(input, normalized_shape)
    hidden = math.prod(shape)
    x, weight, bias = _autocast(input, weight, bias)
    param_type = weight.dtype if weight is not None else bias.dtype if bias is not None else x.dtype
    dtype, param = _DTYPES.get(x.dtype, str(x.dtype)), _DTYPES.get(param_type, str(param_type))
    lib_key = _key(library)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        why = f"weight in {weight.dtype} but bias in {bias.dtype}: lntune takes both in one dtype"
    else:
        why = _unsupported(lib_key, x.device.type, x.device.index or 0, hidden, dtype, param)
    if why:
        if not fallback:
            raise ValueError(f"lntune cannot run this layer_norm: {why} (pass fallback=True to use torch's kernels)")
        warnings.warn(f"lntune: {why}; using torch's layer_norm", stacklevel=3)
        return nn.functional.layer_norm(input, shape, weight, bias, eps)
    ones, zeros = (None, None) if (weight is not None and bias is not None) else _constants(x, hidden, param_type)
    w = (weight if weight.dim() == 1 else weight.reshape(hidden)) if weight is not None else ones
    b = (bias if bias.dim() == 1 else bias.reshape(hidden)) if bias is not None else zeros
    if torch.compiler.is_compiling():
        return torch.ops.lntune.forward(x.reshape(-1, hidden), w, b, float(eps), lib_key)[0].view(x.shape)
    lib = _library(lib_key, x.device, hidden, dtype, param)
    with torch.no_grad():  # the checks see x as rows; the call itself takes x as it is
        launch = lib.torch_launch(x.reshape(-1, hidden), w, b)
    entry = _Eager(launch, check_eps(eps), ones, zeros)
    if key is not None:
        if len(_EAGER) >= _MAX_EAGER:  # shapes that vary without end: start over
            _EAGER.clear()
        _EAGER[key] = entry
    return _run(entry, x, weight, bias)


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
