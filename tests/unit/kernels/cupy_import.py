"""herd.kernels.cupy_moe imported against a stand-in `cupy` module, and the real state put back after."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from herd import kernels


@contextmanager
def cupy_moe_against(cupy: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """herd.kernels.cupy_moe freshly imported with `cupy` as sys.modules["cupy"]; afterwards the cupy_moe that was
    imported before (if any) is back in sys.modules and on the herd.kernels package, else neither has one."""
    real = sys.modules.pop("herd.kernels.cupy_moe", None)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    try:
        yield importlib.import_module("herd.kernels.cupy_moe")
    finally:
        sys.modules.pop("herd.kernels.cupy_moe", None)
        if real is not None:
            sys.modules["herd.kernels.cupy_moe"] = real
            setattr(kernels, "cupy_moe", real)  # noqa: B010 - the package attribute an import sets
        elif hasattr(kernels, "cupy_moe"):
            delattr(kernels, "cupy_moe")
