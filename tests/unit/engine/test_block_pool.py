"""herd.engine.block_pool: reference counts, LRU free list and the prefix-cache index."""

from __future__ import annotations

import pytest

from herd.engine.block_pool import BlockPool

H1, H2, H3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_needs_at_least_one_block(num_blocks: int) -> None:
    with pytest.raises(ValueError, match=str(num_blocks)):
        BlockPool(num_blocks)


def test_fresh_pool_allocates_in_id_order() -> None:
    pool = BlockPool(4)
    assert pool.num_free == 4
    assert [pool.allocate() for _ in range(4)] == [0, 1, 2, 3]
    assert pool.num_free == 0
    assert all(pool.refs(b) == 1 for b in range(4))


def test_allocation_reuses_least_recently_freed_first() -> None:
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    for b in (2, 0, 3):
        pool.release(blocks[b])
    assert pool.num_free == 3
    assert [pool.allocate() for _ in range(3)] == [2, 0, 3]


def test_untouched_blocks_come_before_freed_ones() -> None:
    pool = BlockPool(3)
    first = pool.allocate()
    pool.release(first)
    assert [pool.allocate() for _ in range(3)] == [1, 2, first]


def test_release_to_zero_returns_block_to_free_list() -> None:
    pool = BlockPool(2)
    block = pool.allocate()
    pool.register(block, H1)
    assert pool.take_cached(H1) == block
    assert pool.refs(block) == 2
    free_before = pool.num_free
    pool.release(block)
    assert pool.refs(block) == 1
    assert pool.num_free == free_before  # still used by one sequence
    pool.release(block)
    assert pool.refs(block) == 0
    assert pool.num_free == free_before + 1


def test_block_in_use_is_never_allocated() -> None:
    pool = BlockPool(3)
    held = pool.allocate()
    others = {pool.allocate(), pool.allocate()}
    assert held not in others
    assert pool.num_free == 0


def test_double_release_raises() -> None:
    pool = BlockPool(2)
    block = pool.allocate()
    pool.release(block)
    with pytest.raises(RuntimeError, match=f"block {block}"):
        pool.release(block)
    assert pool.num_free == 2  # the failed release left the free list alone


def test_release_of_never_allocated_block_raises() -> None:
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="block 1"):
        pool.release(1)


def test_unknown_hash_is_not_cached() -> None:
    pool = BlockPool(2)
    assert pool.take_cached(H1) is None
    assert not pool.peek_cached(H1)
    assert pool.num_free == 2


def test_registered_block_in_use_is_shared() -> None:
    pool = BlockPool(3)
    block = pool.allocate()
    pool.register(block, H1)
    assert pool.peek_cached(H1)
    assert pool.refs(block) == 1  # peeking takes no reference
    assert pool.take_cached(H1) == block
    assert pool.refs(block) == 2
    assert pool.num_free == 2


def test_freed_registered_block_is_taken_back_from_free_list() -> None:
    pool = BlockPool(3)
    block = pool.allocate()
    pool.register(block, H1)
    pool.release(block)
    assert pool.num_free == 3
    assert pool.peek_cached(H1)  # freed, but its prefix is still there
    assert pool.take_cached(H1) == block
    assert pool.refs(block) == 1
    assert pool.num_free == 2
    assert block not in {pool.allocate(), pool.allocate()}


def test_taken_back_block_is_freed_again_at_most_recent_end() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, H1)
    pool.release(a)
    pool.release(b)  # free list: a, b
    assert pool.take_cached(H1) == a  # free list: b
    pool.release(a)  # free list: b, a
    assert [pool.allocate(), pool.allocate()] == [b, a]


def test_hash_is_forgotten_once_block_is_reallocated() -> None:
    pool = BlockPool(1)
    block = pool.allocate()
    pool.register(block, H1)
    pool.release(block)
    again = pool.allocate()  # the only block, now for something else
    assert again == block
    assert pool.refs(block) == 1
    assert not pool.peek_cached(H1)
    assert pool.take_cached(H1) is None
    assert pool.refs(block) == 1
    # The block is free to hold a new prefix, and the old hash may go to another block later.
    pool.register(block, H2)
    assert pool.take_cached(H2) == block


def test_reallocation_forgets_only_that_blocks_hash() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, H1)
    pool.register(b, H2)
    pool.release(a)
    pool.release(b)
    assert pool.allocate() == a
    assert not pool.peek_cached(H1)
    assert pool.take_cached(H2) == b


def test_register_keeps_first_block_for_a_hash() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, H1)
    pool.register(b, H1)
    assert pool.take_cached(H1) == a
    # b never got the hash: reallocating it cannot drop a's entry.
    pool.release(b)
    pool.allocate()  # block 2, untouched until now
    assert pool.allocate() == b
    assert pool.take_cached(H1) == a


def test_register_keeps_a_blocks_first_hash() -> None:
    pool = BlockPool(2)
    a = pool.allocate()
    pool.register(a, H1)
    pool.register(a, H3)
    assert pool.take_cached(H3) is None
    assert pool.take_cached(H1) == a


def test_allocation_reports_the_hash_it_evicts() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, H1)
    pool.release(a)
    pool.release(b)
    assert pool.cached_free(H1) and not pool.cached_free(H2)
    assert pool.allocate_evicting() == (a, H1)
    assert not pool.peek_cached(H1)
    assert pool.allocate_evicting() == (b, None)


def test_unregister_drops_only_the_hash_the_block_holds() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(), pool.allocate()
    assert pool.register(a, H1)
    assert not pool.register(b, H1)  # first block with a hash wins
    assert not pool.unregister(b, H1)  # b never held H1: a stays findable
    assert not pool.unregister(a, H2)
    assert pool.cached_block(H1) == a
    assert pool.unregister(a, H1)
    assert not pool.peek_cached(H1) and pool.cached_hashes() == frozenset()
    assert not pool.unregister(a, H1)  # already dropped
    assert pool.refs(a) == 1  # the holder keeps its reference
    assert pool.register(b, H1)  # the hash is free for another block


def test_unregistered_free_block_is_reused_first_and_evicts_nothing() -> None:
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.register(a, H1)
    pool.register(b, H2)
    for block in (a, b, c):
        pool.release(block)  # free list: a, b, c
    assert pool.unregister(b, H2)  # free list: b, a, c
    assert pool.num_free == 3
    assert pool.allocate_evicting() == (b, None)
    assert pool.cached_hashes() == {H1}
    assert pool.take_cached(H2) is None
    pool.release(b)  # released uncached: no hash comes back
    assert [pool.allocate_evicting() for _ in range(3)] == [(a, H1), (c, None), (b, None)]
