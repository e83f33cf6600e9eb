"""The per-user cache of exported variants, so that `lntune.torch` works without a manual export.

Each (target, device, hidden size, dtypes) variant is its own export folder under

    $LNTUNE_CACHE (default ~/.cache/lntune) / <target>-<device>-lntune<version>-tvm<version> / n<N>-<dtypes>

built on first use from the tuning databases shipped with lntune (one log line says what was built
and how long it took). Export writes into a temporary folder and renames it into place, and builders
of one variant take turns on a lock file beside it, so two processes never corrupt an entry and
the second one loads what the first built.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from lntune import __version__, files

LOG = logging.getLogger("lntune")
_LOADED: dict[Path, object] = {}


def root() -> Path:
    """The cache's root folder: $LNTUNE_CACHE, else ~/.cache/lntune."""
    return Path(os.environ.get("LNTUNE_CACHE") or "~/.cache/lntune").expanduser()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def folder(target: str, device: str, hidden: int, spec: str) -> Path:
    """Where the export of one variant lives (keyed by target, device, lntune and TVM versions)."""
    import tvm

    build = _slug(f"{target}-{device}-lntune{__version__}-tvm{tvm.__version__}")
    return root() / build / f"n{hidden}-{_slug(spec.replace(':', '-'))}"


def _loadable(where: Path):
    """The library in `where`, or None when there is none (or it is damaged: it is rebuilt)."""
    from lntune.runner import load

    if not (where / "manifest.json").exists():
        return None
    try:
        return load(where)
    except (OSError, ValueError) as err:
        LOG.warning("lntune: rebuilding the cached export %s (%s)", where, err)
        return None


def library(target: str, device: str, hidden: int, spec: str):
    """The loaded library holding one variant, exported into the cache first if it is not there."""
    where = folder(target, device, hidden, spec)
    lib = _LOADED.get(where)
    if lib is None:
        lib = _loadable(where)
    if lib is None:
        where.parent.mkdir(parents=True, exist_ok=True)
        # Not export's own lock (export takes that inside): this one spans the check and the build.
        with files.locked(where.parent / f".{where.name}.build.lock"):
            lib = _loadable(where)  # another process may have built it while this one waited
            if lib is None:
                lib = _build(target, device, hidden, spec, where)
    _LOADED[where] = lib
    return lib


def _build(target: str, device: str, hidden: int, spec: str, where: Path):
    from lntune.build import export
    from lntune.runner import load

    start = time.perf_counter()
    manifest = export(target, [hidden], [spec], where, log=lambda *_: None)
    sources = sorted({v["schedule"].split(":")[0].split(" ")[0] for v in manifest["variants"]})
    LOG.warning(
        "lntune: built %s N=%d %s for %s in %.1f s (%s kernels) into %s",
        target,
        hidden,
        spec,
        device,
        time.perf_counter() - start,
        "/".join(sources),
        where,
    )
    return load(where)
