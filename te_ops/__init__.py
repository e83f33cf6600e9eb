"""The LayerNorm math, once: TE compute definitions and their float64 numpy references."""

from te_ops.layer_norm import DTYPES, OPS, Kernel

__all__ = ["DTYPES", "OPS", "Kernel"]
