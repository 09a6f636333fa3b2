"""Mutants of herd's own kernels, run under a sanitizer in a process started with its runtime preloaded
(test_herd_mutants.py starts it): `python -m tests.unit.cudaemu.herd_mutants VARIANT CASE`.

Each case first runs the unmutated kernel, then writes MUTANT_MARK to stderr and runs the mutant, so a report
can be told apart: nothing before the mark (the kernel is clean), the expected report after it. The mutant is
the text of herd/kernels/cuda/NAME.cu with one edit (`mutate` insists the edited text occurs exactly once, so a
change to the kernel fails here loudly instead of leaving the mutant equal to the original)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from tests.cudaemu import ORDERS, Module, compile_module
from tests.unit.cudaemu.sanitized import COMPILE_OPTIONS, address, gemv, source

MUTANT_MARK = "=== the mutant from here on ==="

CASES: dict[str, Callable[[str], None]] = {}

GEMV_BARRIER = ("        xs[i] = load_float(x + static_cast<long long>(r) * d_in + in0 + (i - r * width));\n"
                "    }\n    __syncthreads();\n", "__syncthreads();\n")
"""int4.cu's GEMV: the barrier between staging the block's slice of x in shared memory and reading it."""
POSITIONS_BARRIER = ("        if (lane == 0) warp_counts[warp] = __popc(ballot);\n        __syncthreads();\n",
                     "__syncthreads();\n")
"""permute.cu's moe_positions: the barrier between each warp's count and thread 0 summing them."""
COMBINE_ROW = ("source_row[static_cast<long long>(t) * k + choice]", "choice]", "choice + 1]")
"""combine.cu: the index of token t's choice in source_row, one too far (the last token reads past the end)."""


def mutate(name: str, context: str, old: str, new: str) -> str:
    """herd's NAME.cu with `old` replaced by `new` inside `context`, which must occur exactly once."""
    text: str = source(name)
    assert text.count(context) == 1, f"{name}.cu no longer has exactly one {context!r}"
    assert context.count(old) == 1, f"{old!r} is not once in {context!r}"
    return text.replace(context, context.replace(old, new))


def case(run: Callable[[str], None]) -> Callable[[str], None]:
    CASES[run.__name__] = run
    return run


def mutant_from_here() -> None:
    sys.stderr.write(f"{MUTANT_MARK}\n")
    sys.stderr.flush()


def positions(module: Module, order: str) -> tuple[np.ndarray, np.ndarray]:
    """moe_positions over 70 rows on 3 groups, one block of 64 threads (two warps) per group: source_row and
    what it should be (rows grouped stably)."""
    rows, groups = 70, 3
    ids = (np.arange(rows, dtype=np.int32) * 7) % groups
    rank = np.arange(groups, dtype=np.int64)
    counts = np.bincount(ids, minlength=groups)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    row_source, source_row = np.full(rows, -1, dtype=np.int32), np.full(rows, -1, dtype=np.int32)
    module.launch("moe_positions", (groups, 1, 1), (64, 1, 1),
                  [address(ids), rows, address(rank), address(offsets), address(row_source), address(source_row)],
                  order=order, seed=5)
    return source_row, np.argsort(np.argsort(ids, kind="stable")).astype(np.int32)


def combine(module: Module, order: str) -> tuple[np.ndarray, np.ndarray]:
    """moe_combine_f32 of 5 tokens, k = 2, H = 3, launched as cupy_moe.combine does: out [5, 3] and the sum
    it should be."""
    tokens, k, hidden = 5, 2, 3
    out_rows = np.arange(tokens * k * hidden, dtype=np.float32).reshape(tokens * k, hidden)
    source_row = np.random.default_rng(0).permutation(tokens * k).astype(np.int32)
    out = np.zeros((tokens, hidden), dtype=np.float32)
    module.launch("moe_combine_f32", (tokens, 1, 1), (256, 1, 1),
                  [address(out_rows), address(source_row), tokens, k, hidden, address(out)], order=order)
    return out, out_rows[source_row].reshape(tokens, k, hidden).sum(axis=1)


@case
def gemv_without_barrier(variant: str) -> None:
    """TSan: threads read the x slice that other threads stage, with no barrier between."""
    clean = compile_module(source("int4"), COMPILE_OPTIONS, variant=variant)
    for order in ORDERS:
        gemv(clean, shared_bytes=2 * 8 * 4, order=order)
    mutant_from_here()
    mutant = compile_module(mutate("int4", *GEMV_BARRIER, ""), COMPILE_OPTIONS, variant=variant)
    gemv(mutant, shared_bytes=2 * 8 * 4, order="forward")


@case
def positions_without_barrier(variant: str) -> None:
    """TSan: thread 0 sums the warp counts that lane 0 of each warp writes, with no barrier between."""
    clean = compile_module(source("permute"), COMPILE_OPTIONS, variant=variant)
    for order in ORDERS:
        np.testing.assert_array_equal(*positions(clean, order))
    mutant_from_here()
    positions(compile_module(mutate("permute", *POSITIONS_BARRIER, ""), COMPILE_OPTIONS, variant=variant), "forward")


@case
def combine_row_off_by_one(variant: str) -> None:
    """ASan: the last token's last choice reads source_row[T * k], one int past the array."""
    clean = compile_module(source("combine"), COMPILE_OPTIONS, variant=variant)
    for order in ORDERS:
        np.testing.assert_array_equal(*combine(clean, order))
    mutant_from_here()
    combine(compile_module(mutate("combine", *COMBINE_ROW), COMPILE_OPTIONS, variant=variant), "forward")


if __name__ == "__main__":
    CASES[sys.argv[2]](sys.argv[1])
    print("case finished")
