"""lntune: LayerNorm forward, statistics and one-pass backward kernels, tuned per GPU with TVM."""

__version__ = "0.1.0"


def load(path):
    """Load an exported library directory (or its lntune.so); see lntune.runner.Library."""
    from lntune.runner import load as _load

    return _load(path)


__all__ = ["__version__", "load"]
