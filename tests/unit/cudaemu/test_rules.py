"""CUDA's rules, enforced: launches CUDA refuses (LaunchError) and kernels that break a barrier or warp rule
(EmulatorError naming the kernel and the rule), each with the mutant that breaks it."""

from __future__ import annotations

import numpy as np
import pytest

from herd.kernels.cuda_sources import COMPILE_OPTIONS, source
from tests.cudaemu import ORDERS, EmulatorError, LaunchError, compile_module
from tests.unit.cudaemu.sources import BLOCK_SUM, DIVERGENT, MUTANTS


@pytest.fixture(scope="module")
def mutants():
    return compile_module(MUTANTS)


@pytest.fixture(scope="module")
def module():
    return compile_module(BLOCK_SUM)


@pytest.mark.parametrize(("grid", "block", "shared", "rule"), [
    ((0, 1, 1), (32, 1, 1), 0, r"grid x = 0 outside CUDA's limit 1\.\.2147483647"),
    ((1, 1, 1), (32, 0, 1), 0, r"block y = 0 outside"),
    ((1, 1, 1), (2048, 1, 1), 0, r"block x = 2048 outside CUDA's limit 1\.\.1024"),
    ((1, 1, 1), (64, 32, 1), 0, r"block \(64, 32, 1\) has 2048 threads, more than CUDA's 1024"),
    ((1, 1, 1), (1, 1, 65), 0, r"block z = 65 outside CUDA's limit 1\.\.64"),
    ((2**31, 1, 1), (32, 1, 1), 0, r"grid x = 2147483648 outside"),
    ((1, 65536, 1), (32, 1, 1), 0, r"grid y = 65536 outside CUDA's limit 1\.\.65535"),
    ((1, 1, 65536), (32, 1, 1), 0, r"grid z = 65536 outside"),
    ((1, 1, 1), (32, 1, 1), 48 * 1024 + 4, r"dynamic shared memory 49156 bytes outside CUDA's default limit"),
])
def test_launches_cuda_refuses(module, grid, block, shared, rule):
    out = np.zeros(64, dtype=np.int32)
    with pytest.raises(LaunchError, match=rf"neighbour_unsynced: {rule}"):
        module.launch("neighbour_unsynced", grid, block, [out.ctypes.data], shared_bytes=shared)


def test_the_largest_launches_cuda_allows_are_accepted(module):
    out = np.zeros(1024, dtype=np.int32)
    module.launch("neighbour_unsynced", (1, 1, 1), (1024, 1, 1), [out.ctypes.data], shared_bytes=48 * 1024)
    assert out[0] == -1 and out[1023] == 0  # forward: slot 1 unwritten when thread 0 reads it


@pytest.mark.parametrize("order", ORDERS)
def test_a_barrier_half_the_block_never_reaches(mutants, order):
    out = np.zeros(32, dtype=np.int32)
    with pytest.raises(EmulatorError, match=r"half_barrier: .*barrier with exited threads"):
        mutants.launch("half_barrier", (1, 1, 1), (32, 1, 1), [out.ctypes.data], order=order, seed=2)


def test_two_halves_at_different_barriers(mutants):
    out = np.zeros(32, dtype=np.int32)
    with pytest.raises(EmulatorError, match=r"split_barrier: .*divergent __syncthreads: this thread is at .*:\d+ "
                                            r"while 16 others wait at .*:\d+"):
        mutants.launch("split_barrier", (1, 1, 1), (32, 1, 1), [out.ctypes.data])


@pytest.mark.parametrize("order", ORDERS)
def test_a_deadlock_between_a_shuffle_and_a_barrier(mutants, order):
    out = np.zeros(32, dtype=np.int32)
    with pytest.raises(EmulatorError, match=r"shuffle_vs_barrier: block \(0,0,0\) deadlock: every live thread "
                                            r"waits \(thread \(\d+,0,0\) (at __syncthreads|in __shfl_down_sync)"):
        mutants.launch("shuffle_vs_barrier", (1, 1, 1), (32, 1, 1), [out.ctypes.data], order=order, seed=7)


def test_a_full_mask_in_a_16_thread_block(mutants):
    out = np.zeros(16, dtype=np.int32)
    with pytest.raises(EmulatorError, match=r"full_mask_shuffle: .*__shfl_down_sync at .*:\d+ with mask 0xffffffff "
                                            r"names lanes beyond the 16 threads of warp 0 \(block of 16 threads\)"):
        mutants.launch("full_mask_shuffle", (1, 1, 1), (16, 1, 1), [out.ctypes.data])


def test_a_full_mask_in_a_48_thread_blocks_last_warp(mutants):
    out = np.zeros(48, dtype=np.int32)
    with pytest.raises(EmulatorError, match=r"names lanes beyond the 16 threads of warp 1 \(block of 48 threads\)"):
        mutants.launch("full_mask_shuffle", (1, 1, 1), (48, 1, 1), [out.ctypes.data])


def test_the_same_shuffle_in_whole_warps_is_fine(mutants):
    out = np.zeros(64, dtype=np.int32)
    mutants.launch("full_mask_shuffle", (1, 1, 1), (64, 1, 1), [out.ctypes.data], order="reverse")
    np.testing.assert_array_equal(out, [t if t % 32 == 31 else t + 1 for t in range(64)])


@pytest.mark.parametrize("order", ORDERS)
def test_a_mask_naming_exited_lanes(mutants, order):
    """Whichever runs first, the exits or the shuffles, the launch fails on the exited lanes."""
    out = np.zeros(32, dtype=np.int32)
    with pytest.raises(EmulatorError, match=r"shuffle_after_exit: .*(names lane \d+, which has exited|exited while "
                                            r"lane \d+ waits in __shfl_down_sync\(mask 0xffffffff\))"):
        mutants.launch("shuffle_after_exit", (1, 1, 1), (32, 1, 1), [out.ctypes.data], order=order, seed=9)


def test_different_intrinsics_on_one_mask():
    module = compile_module(DIVERGENT)
    out = np.zeros(32, dtype=np.int32)
    with pytest.raises(EmulatorError, match=r"shuffle_vs_ballot: .*divergent warp intrinsics: __ballot_sync\(mask "
                                            r"0xffffffff\) at .*while lane 0 waits in __shfl_down_sync"):
        module.launch("shuffle_vs_ballot", (1, 1, 1), (32, 1, 1), [out.ctypes.data])
    with pytest.raises(EmulatorError, match=r"mask_without_caller: .*thread \(0,0,0\): __ballot_sync at .* with mask "
                                            r"0xfffffffe that does not name the calling lane 0"):
        module.launch("mask_without_caller", (1, 1, 1), (32, 1, 1), [out.ctypes.data])
    with pytest.raises(EmulatorError, match=r"read_outside_mask: .*__shfl_sync at .*: lane 0 reads lane 20, which "
                                            r"is not in mask 0x0000ffff"):
        module.launch("read_outside_mask", (1, 1, 1), (16, 1, 1), [out.ctypes.data])


def test_herds_route_launch_with_a_block_not_a_multiple_of_32():
    """gating.cu assumes whole warps (FULL_MASK shuffles): a 48-thread block is caught, not silently wrong."""
    module = compile_module(source("gating"), COMPILE_OPTIONS)
    logits = np.zeros((2, 8), dtype=np.float32)
    ids, scores = np.zeros((2, 1), dtype=np.int32), np.zeros((2, 1), dtype=np.float32)
    with pytest.raises(EmulatorError, match=r"route_topk_sigmoid_f32: block \(0,0,0\) thread \(32,0,0\): "
                                            r"__shfl_down_sync at .*module\.cu:37 with mask 0xffffffff "
                                            r"names lanes beyond the 16 threads of warp 1"):
        module.launch("route_topk_sigmoid_f32", (1, 1, 1), (48, 1, 1),
                      [logits.ctypes.data, 2, 8, 1, ids.ctypes.data, scores.ctypes.data])
