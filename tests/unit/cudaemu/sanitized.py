"""Cases run under a sanitizer, in a process started with its runtime preloaded (test_sanitizers.py starts it):
`python -m tests.unit.cudaemu.sanitized VARIANT CASE`. A clean case exits 0 with no report; a positive
control must be reported (ASan/UBSan abort the process, TSan exits 66 at the end)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.cudaemu import ORDERS, Module, compile_module
from tests.unit.cudaemu.sources import SANITIZED

# herd.kernels.cuda_sources by its path: importing the herd.kernels package would load torch, seconds under TSan.
_SPEC = importlib.util.spec_from_file_location(
    "cuda_sources", Path(__file__).resolve().parents[3] / "herd" / "kernels" / "cuda_sources.py")
assert _SPEC is not None and _SPEC.loader is not None
cuda_sources = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cuda_sources)
COMPILE_OPTIONS, source = cuda_sources.COMPILE_OPTIONS, cuda_sources.source

CASES: dict[str, Callable[[str], None]] = {}


def case(run: Callable[[str], None]) -> Callable[[str], None]:
    CASES[run.__name__] = run
    return run


def address(array: np.ndarray) -> int:
    return array.ctypes.data


def gemv(module: Module, shared_bytes: int, order: str) -> np.ndarray:
    """int4.cu's split-K GEMV, partial then reduce: x [2, 16] @ W [16, 8], two splits of 8 inputs."""
    rows, d_in, d_out, group, split = 2, 16, 8, 8, 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, d_in)).astype(np.float32)
    packed = rng.integers(0, 256, size=(d_in // 2, d_out), dtype=np.uint8)
    scales = np.full((d_in // group, d_out), 0x3F80, dtype=np.uint16)  # bf16 1.0
    partials = np.zeros((2, rows, d_out), dtype=np.float32)
    out = np.zeros((rows, d_out), dtype=np.float32)
    module.launch("int4_gemv_partial_f32", (1, 2, 1), (32, 1, 1),
                  [address(x), address(packed), address(scales), rows, d_in, d_out, group, split, address(partials)],
                  shared_bytes=shared_bytes, order=order)
    module.launch("int4_gemv_reduce_f32", (1, 1, 1), (64, 1, 1), [address(partials), 2, rows * d_out, address(out)])
    return out


@case
def clean(variant: str) -> None:
    """The test kernels used correctly and herd's kernels on small shapes: no report."""
    module = compile_module(SANITIZED, variant=variant)
    permute = compile_module(source("permute"), COMPILE_OPTIONS, variant=variant)
    gating = compile_module(source("gating"), COMPILE_OPTIONS, variant=variant)
    int4 = compile_module(source("int4"), COMPILE_OPTIONS, variant=variant)
    for order in ORDERS:
        out = np.zeros(64, dtype=np.float32)
        module.launch("shared_overrun", (1, 1, 1), (64, 1, 1), [address(out), 0, 64], shared_bytes=256, order=order)
        assert (out == 1.0).all()
        published = np.zeros(3, dtype=np.int32)
        module.launch("publish", (3, 1, 1), (64, 1, 1), [address(published), 1], order=order)
        assert (published == 42).all()
        counts = np.arange(40, dtype=np.int32) % 5
        offsets = np.zeros(41, dtype=np.int64)
        permute.launch("moe_offsets", (1, 1, 1), (1024, 1, 1), [address(counts), 40, address(offsets)], order=order)
        assert (offsets[1:] == np.cumsum(counts)).all()
        logits = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
        ids, scores = np.zeros((3, 2), dtype=np.int32), np.zeros((3, 2), dtype=np.float32)
        gating.launch("route_topk_sigmoid_f32", (1, 1, 1), (96, 1, 1),
                      [address(logits), 3, 40, 2, address(ids), address(scores)], order=order)
        assert (ids == np.argsort(-logits, axis=1, kind="stable")[:, :2]).all()
        gemv(int4, shared_bytes=2 * 8 * 4, order=order)


@case
def shared_overrun(variant: str) -> None:
    """Reads the float just past the launch's 256 bytes of dynamic shared memory."""
    out = np.zeros(64, dtype=np.float32)
    compile_module(SANITIZED, variant=variant).launch("shared_overrun", (1, 1, 1), (64, 1, 1), [address(out), 1, 64],
                                                      shared_bytes=256)


@case
def gemv_short_shared(variant: str) -> None:
    """herd's GEMV launched with one float less shared memory than its x slice needs."""
    gemv(compile_module(source("int4"), COMPILE_OPTIONS, variant=variant), shared_bytes=2 * 8 * 4 - 4,
         order="forward")


@case
def shift_overflow(variant: str) -> None:
    out = np.zeros(32, dtype=np.int32)
    compile_module(SANITIZED, variant=variant).launch("shift_left", (1, 1, 1), (32, 1, 1), [address(out), 40])


@case
def missing_barrier(variant: str) -> None:
    """Thread 0's shared write and thread 1's read with no barrier between (in each order)."""
    module = compile_module(SANITIZED, variant=variant)
    for order in ORDERS:
        published = np.zeros(2, dtype=np.int32)
        module.launch("publish", (2, 1, 1), (32, 1, 1), [address(published), 0], order=order)


if __name__ == "__main__":
    CASES[sys.argv[2]](sys.argv[1])
    print("case finished")
