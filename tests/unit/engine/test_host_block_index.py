"""herd.engine.host_block_index: the host tier's bounded LRU of slots by prefix hash, with pinning."""

from __future__ import annotations

from herd.engine.host_block_index import HostBlockIndex, host_blocks
from herd.engine.kv_cache_manager import CHUNKED, FULL, KVLayout

H1, H2, H3, H4 = (bytes([i]) * 32 for i in range(1, 5))


def test_slots_fill_then_the_least_recently_used_hash_goes() -> None:
    index = HostBlockIndex({FULL: 2})
    assert index.put(FULL, H1) == 0
    assert index.put(FULL, H2) == 1
    assert index.put(FULL, H1) is None  # already held: no copy, but now the most recent
    assert index.put(FULL, H3) == 1  # H2 was least recent
    assert (index.has(FULL, H1), index.has(FULL, H2), index.has(FULL, H3)) == (True, False, True)
    assert index.held(FULL) == 2


def test_take_makes_recent_and_pins_until_the_copies_are_taken() -> None:
    index = HostBlockIndex({FULL: 2})
    index.put(FULL, H1)
    index.put(FULL, H2)
    assert index.take(FULL, H1) == 0
    assert index.put(FULL, H3) == 1  # H2 goes, not the pinned (and more recent) H1
    index.take(FULL, H3)
    assert index.put(FULL, H4) is None  # every slot pinned: the block is not saved
    assert not index.has(FULL, H4)
    index.unpin_all()
    assert index.put(FULL, H4) == 0  # H1 is now the least recent


def test_groups_are_separate() -> None:
    index = HostBlockIndex({FULL: 1, CHUNKED: 1})
    index.put(FULL, H1)
    assert not index.has(CHUNKED, H1)
    assert index.put(CHUNKED, H1) == 0
    assert index.held(FULL) == index.held(CHUNKED) == 1


def test_host_capacity_splits_like_the_device_pools() -> None:
    layout = KVLayout(block_size=4, chunk_size=8, num_blocks={FULL: 30, CHUNKED: 10},
                      bytes_per_block={FULL: 100, CHUNKED: 300})
    assert host_blocks(layout, 6000) == {FULL: 30, CHUNKED: 10}
    assert host_blocks(layout, 3000) == {FULL: 15, CHUNKED: 5}
