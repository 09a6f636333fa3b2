"""The emulator runs kernels as CUDA would: grid and block indices, barriers, warp intrinsics, atomics, and the
fiber resume order (forward, reverse, random) actually varied."""

from __future__ import annotations

import numpy as np
import pytest

from herd.kernels.cuda_sources import COMPILE_OPTIONS, source
from tests.cudaemu import ORDERS, EmulatorError, compile_module
from tests.unit.cudaemu.sources import BLOCK_SUM


@pytest.fixture(scope="module")
def module():
    return compile_module(BLOCK_SUM)


def address(array: np.ndarray) -> int:
    return array.ctypes.data


@pytest.mark.parametrize("order", ORDERS)
def test_block_sum_is_exact_in_every_order(module, order):
    n = 5000
    x = np.arange(n, dtype=np.float32) % 17  # small integers: every summation order is exact
    out = np.zeros(4, dtype=np.float32)
    module.launch("block_sum", (4, 1, 1), (128, 1, 1), [address(x), n, address(out)], order=order, seed=3)
    expected = [x[[i for i in range(n) if (i // 128) % 4 == b]].sum() for b in range(4)]
    np.testing.assert_array_equal(out, np.array(expected, dtype=np.float32))


def test_every_thread_sees_its_own_coordinates(module):
    grid, block = (3, 2, 2), (4, 3, 2)
    out = np.full(12 * 24, -1, dtype=np.int64)
    module.launch("coordinates", grid, block, [address(out)], order="random", seed=1)
    expected = [((((bz * 256 + by) * 256 + bx) * 256 + tz) * 256 + ty) * 256 + tx
                for bz in range(2) for by in range(2) for bx in range(3)
                for tz in range(2) for ty in range(3) for tx in range(4)]
    np.testing.assert_array_equal(out, np.array(expected, dtype=np.int64))


@pytest.mark.parametrize("order", ORDERS)
def test_ballot_scan_broadcast_and_atomics(module, order):
    blocks, threads = 3, 64
    flags = (np.random.default_rng(0).random(blocks * threads) < 0.4).astype(np.int32)
    ballots = np.zeros(blocks * threads // 32, dtype=np.uint32)
    prefix, broadcast = np.zeros_like(flags), np.zeros_like(flags)
    total = np.zeros(1, dtype=np.int32)
    module.launch("warp_mix", (blocks, 1, 1), (threads, 1, 1),
                  [address(a) for a in (flags, ballots, prefix, broadcast, total)], order=order, seed=5)
    warps = flags.reshape(-1, 32)
    np.testing.assert_array_equal(ballots, (warps.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(1))
    np.testing.assert_array_equal(prefix, np.cumsum(warps, axis=1).reshape(-1))
    np.testing.assert_array_equal(broadcast, np.repeat(np.arange(0, blocks * threads, 32) + 7, 32))
    assert total[0] == flags.sum()


def test_the_resume_order_is_what_was_asked():
    """Without a barrier a thread reads its neighbour's slot before (forward) or after (reverse) it is written;
    unwritten dynamic shared memory reads as all ones (-1)."""
    module = compile_module(BLOCK_SUM)
    results = {}
    for order, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
        out = np.zeros(64, dtype=np.int32)
        module.launch("neighbour_unsynced", (1, 1, 1), (64, 1, 1), [address(out)], shared_bytes=256, order=order,
                      seed=seed)
        results[order, seed] = out
    np.testing.assert_array_equal(results["forward", 0], [-1] * 63 + [0])
    np.testing.assert_array_equal(results["reverse", 0], [*range(1, 64), -1])
    random_1, random_2 = results["random", 1], results["random", 2]
    assert not np.array_equal(random_1, random_2)
    for out in (random_1, random_2):  # each slot either not yet written or its neighbour's id
        assert all(value in (-1, (t + 1) % 64) for t, value in enumerate(out))


def test_arguments_are_checked_against_the_signature(module):
    out = np.zeros(1, dtype=np.float32)
    with pytest.raises(TypeError, match="block_sum takes 3 arguments, got 2"):
        module.launch("block_sum", (1, 1, 1), (32, 1, 1), [address(out), 1])
    with pytest.raises(TypeError, match="parameter n"):
        module.launch("block_sum", (1, 1, 1), (32, 1, 1), [address(out), 1.5, address(out)])
    with pytest.raises(TypeError, match="parameter n"):
        module.launch("block_sum", (1, 1, 1), (32, 1, 1), [address(out), 2**31, address(out)])
    with pytest.raises(EmulatorError, match="no kernel 'missing'"):
        module.launch("missing", (1, 1, 1), (32, 1, 1), [])


def test_a_source_that_does_not_compile_says_why():
    with pytest.raises(EmulatorError, match=r"compile failed(.|\n)*undeclared_thing"):
        compile_module('extern "C" __global__ void broken(int* out) { out[0] = undeclared_thing; }')


HERD_KERNELS = {
    "gating": ["route_topk_sigmoid_bf16", "route_topk_sigmoid_f32"],
    "permute": ["moe_gather_scale_bf16", "moe_gather_scale_f32", "moe_histogram", "moe_offsets", "moe_positions"],
    "combine": ["moe_combine_bf16", "moe_combine_f32"],
    "int4": ["int4_dequantize_bf16", "int4_dequantize_f32", "int4_gemv_partial_bf16", "int4_gemv_partial_f32",
             "int4_gemv_reduce_bf16", "int4_gemv_reduce_f32"],
}


@pytest.mark.parametrize("name", sorted(HERD_KERNELS))
def test_herds_kernels_compile_unmodified(name):
    module = compile_module(source(name), COMPILE_OPTIONS)
    assert sorted(module.signatures) == HERD_KERNELS[name]
    for kernel in module.signatures:  # each has an entry the launcher calls
        assert getattr(module._lib, f"cudaemu_entry_{kernel}") is not None


@pytest.mark.parametrize("order", ORDERS)
def test_herds_offsets_scan_a_1024_thread_block(order):
    """permute.cu's moe_offsets: a Hillis-Steele scan over 1024 fibers, 20 barriers."""
    module = compile_module(source("permute"), COMPILE_OPTIONS)
    counts = np.random.default_rng(1).integers(0, 9, size=100).astype(np.int32)
    offsets = np.full(101, -1, dtype=np.int64)
    module.launch("moe_offsets", (1, 1, 1), (1024, 1, 1), [address(counts), 100, address(offsets)], order=order,
                  seed=11)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts)]))


@pytest.mark.parametrize("order", ORDERS)
def test_herds_gating_picks_the_top_k(order):
    """gating.cu's route_topk_sigmoid_f32: warp arg-max rounds with shuffles, one warp per token."""
    module = compile_module(source("gating"), COMPILE_OPTIONS)
    tokens, experts, k = 5, 40, 3
    logits = np.random.default_rng(2).standard_normal((tokens, experts)).astype(np.float32)
    ids = np.zeros((tokens, k), dtype=np.int32)
    scores = np.zeros((tokens, k), dtype=np.float32)
    module.launch("route_topk_sigmoid_f32", (2, 1, 1), (128, 1, 1),
                  [address(logits), tokens, experts, k, address(ids), address(scores)], order=order, seed=4)
    expected = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-np.take_along_axis(logits, expected, 1))), rtol=1e-6)


def test_numpy_scalars_pass_as_their_values(module):
    x = np.ones(64, dtype=np.float32)
    out = np.zeros(1, dtype=np.float32)
    module.launch("block_sum", (np.int64(1), 1, 1), (64, 1, 1), [address(x), np.int32(40), address(out)])
    assert out[0] == 40.0
