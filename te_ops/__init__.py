"""The LayerNorm math, once: TE compute definitions (te_ops.layer_norm) and float64 numpy references
(te_ops.reference). The references import only numpy, so runtime-only users can check against them."""
