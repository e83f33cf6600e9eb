"""Checks of scalar arguments shared by the runner and the integrations (no TVM import)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

_F32_NORMAL_MIN = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)


def check_eps(eps: Any) -> float:
    """eps as a Python float: any real number (numpy scalars included) that is finite, > 0 and still
    > 0 and finite as the float32 the kernels receive (1e-300 would silently become 0)."""
    if type(eps) is float and _F32_NORMAL_MIN <= eps <= _F32_MAX:  # the common case, checked cheaply
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps must be a real number > 0, got {eps!r}")
    value = float(eps)
    as_f32 = float(np.float32(value)) if math.isfinite(value) and abs(value) <= _F32_MAX else math.inf
    if not (math.isfinite(value) and value > 0 and 0 < as_f32 < math.inf):
        raise ValueError(f"eps must be a finite number > 0 that float32 can hold (1.4e-45 to 3.4e38), got {eps!r}")
    return value
