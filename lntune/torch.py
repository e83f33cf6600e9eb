"""PyTorch drop-in: `LayerNorm` and `layer_norm` backed by an exported lntune library.

The kernels are registered as torch.library custom ops (`lntune::forward`, `lntune::backward`) with
fake implementations and an autograd formula, so eager code, autograd and torch.compile all reach the
same compiled kernels. Tensors go to the library zero-copy through DLPack; outputs are allocated by
torch. Inputs of any leading shape are flattened to rows; `normalized_shape` may span several
trailing dimensions (they are flattened into the hidden size N).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from lntune.runner import Library, load

_LIBRARIES: dict[str, Library] = {}


def _library(path: str) -> Library:
    """Libraries are named by path inside custom ops (ops take tensors, numbers and strings only)."""
    if path not in _LIBRARIES:
        _LIBRARIES[path] = load(path)
    return _LIBRARIES[path]


@torch.compiler.assume_constant_result
def _resolve(library: str | Path | Library) -> str:
    """The key of a library (its resolved directory), loading it on first use; constant under compile."""
    if isinstance(library, str) and library in _LIBRARIES:
        return library
    if isinstance(library, Library):
        key = str(library.directory)
        _LIBRARIES.setdefault(key, library)
        return key
    key = str(Path(library).resolve())
    _library(key)
    return key


@torch.library.custom_op("lntune::forward", mutates_args=())
def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, library: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _library(library).forward(x, weight, bias, eps)


@_forward.register_fake
def _(x, weight, bias, eps, library):
    rows = x.shape[0]
    stats = x.new_empty((rows,), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("lntune::backward", mutates_args=())
def _backward(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, library: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _library(library).backward(dy.contiguous(), x, mean, rstd, weight)


@_backward.register_fake
def _(dy, x, mean, rstd, weight, library):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _bias, _eps, library = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight)
    ctx.library = library


def _autograd(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight = ctx.saved_tensors
    dx, dweight, dbias = _backward(dy, x, mean, rstd, weight, ctx.library)
    return dx, dweight, dbias, None, None


_forward.register_autograd(_autograd, setup_context=_setup_context)


def _hidden(x: torch.Tensor, normalized_shape) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or tuple(x.shape[-len(shape) :]) != shape:
        raise ValueError(
            f"normalized_shape {shape} must match the trailing dimensions of input of shape {tuple(x.shape)}"
        )
    return shape


@torch.compiler.assume_constant_result
def _has_variant(key: str, hidden: int, dtype: str) -> bool:
    return (hidden, dtype) in _library(key).variants


def layer_norm(
    x: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    library: str | Path | Library,
    fallback: bool = False,
) -> torch.Tensor:
    """torch.nn.functional.layer_norm through lntune's kernels.

    A (hidden size, dtype) the library has no variant for raises ValueError, or with fallback=True
    warns and uses torch's own kernels.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    shape = _hidden(x, normalized_shape)
    hidden = math.prod(shape)
    key = _resolve(library)
    dtype = str(x.dtype).removeprefix("torch.")
    if not _has_variant(key, hidden, dtype):
        if not fallback:
            raise ValueError(
                f"the lntune library {key} has no variant for hidden={hidden}, dtype={dtype}; "
                f"it has {_library(key).variants} (pass fallback=True to use torch's kernels)"
            )
        warnings.warn(f"lntune: no variant for hidden={hidden}, dtype={dtype}; using torch's layer_norm", stacklevel=2)
        return nn.functional.layer_norm(x, shape, weight, bias, eps)
    w = weight.reshape(hidden) if weight is not None else x.new_ones(hidden)
    b = bias.reshape(hidden) if bias is not None else x.new_zeros(hidden)
    rows = x.reshape(-1, hidden)
    y, _mean, _rstd = torch.ops.lntune.forward(rows.contiguous(), w.contiguous(), b.contiguous(), float(eps), key)
    return y.reshape(x.shape)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm with lntune's kernels: same parameters (`weight`, `bias`) and arguments,
    plus `library` (an export directory or a loaded lntune.Library) and `fallback`."""

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        library: str | Path | Library,
        fallback: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.library = _resolve(library)
        self.fallback = fallback
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(
            x, self.normalized_shape, self.weight, self.bias, self.eps, library=self.library, fallback=self.fallback
        )

    def extra_repr(self) -> str:
        affine = self.elementwise_affine
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={affine}, library={self.library}"
