"""Shared fixtures: libraries are exported once per test session (compiling is the slow part)."""

from __future__ import annotations

import os
import warnings

import pytest

from lntune.build import export
from lntune.runner import load

HIDDEN = (1, 7, 128, 768, 1000, 4096)
DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(scope="session")
def llvm_library(tmp_path_factory):
    """The llvm library with every hidden size and dtype the tests use, baseline schedules."""
    out = tmp_path_factory.mktemp("llvm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export("llvm", HIDDEN, DTYPES, out, log=lambda *_: None)
    return load(out)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """lntune.torch's per-user cache in a folder of the test session's own, never the user's."""
    os.environ["LNTUNE_CACHE"] = str(tmp_path_factory.mktemp("lntune-cache"))
