"""The trunks' global-layer pools as one (context parallelism): each trunk's ids, home first, room and prefix cache
over all of them, and a manager whose sequence outgrows its own memory."""

from __future__ import annotations

import pytest

from herd.engine.block_pool import BlockPool
from herd.engine.kv_cache_manager import FULL, KVCacheManager, KVLayout
from herd.engine.shared_blocks import SharedBlocks
from tests.unit.engine.fakes import BLOCK, CHUNK, kv_manager, seq


def _shared(trunks: int = 3, blocks: int = 4) -> SharedBlocks:
    return SharedBlocks([BlockPool(blocks) for _ in range(trunks)])


def test_home_blocks_keep_their_ids_and_a_peers_come_past_the_scratch_block():
    shared = _shared()
    zero, two = shared.view(0), shared.view(2)
    home = [zero.allocate() for _ in range(4)]
    assert home == [0, 1, 2, 3] and zero.used == 4 and zero.num_free == 8  # every trunk's room
    spilled = zero.allocate()  # home is full: the freest peer (both have 4; the first by rank)
    assert spilled > 4 and zero.holder(spilled) == (1, 0)
    assert two.holder(0) == (2, 0) and two.holder(spilled) == (spilled // 5 - 1, spilled % 5)
    assert shared.pools[1].used == 1 and zero.used == 4  # used counts what a trunk's memory holds
    zero.release(spilled)
    assert shared.pools[1].used == 0
    with pytest.raises(ValueError, match="same number of blocks"):
        SharedBlocks([BlockPool(4), BlockPool(5)])


def test_a_trunk_takes_the_freest_peers_blocks_once_its_own_are_gone():
    shared = _shared()
    one, zero = shared.view(1), shared.view(0)
    for _ in range(3):
        one.allocate()  # trunk 1 has 1 free
    for _ in range(4):
        zero.allocate()
    assert zero.holder(zero.allocate())[0] == 2  # trunk 2 has 4 free, trunk 1 only 1


def test_the_prefix_cache_is_every_trunks_with_one_copy_of_a_hash():
    shared = _shared(2)
    zero, one = shared.view(0), shared.view(1)
    block = zero.allocate()
    assert zero.register(block, b"h") and not one.register(one.allocate(), b"h")  # cached once per replica
    zero.release(block)
    assert one.peek_cached(b"h") and one.cached_free(b"h")
    taken = one.take_cached(b"h")
    assert one.holder(taken) == (0, block) and shared.pools[0].refs(block) == 1 and not one.cached_free(b"h")
    assert one.cached_block(b"h") == taken and one.cached_hashes() == {b"h"}
    assert one.unregister(taken, b"h") and not zero.peek_cached(b"h")


def test_a_managers_sequence_longer_than_its_trunk_takes_global_blocks_of_the_others():
    layout = KVLayout(block_size=BLOCK, chunk_size=CHUNK, num_blocks={FULL: 4, "chunked": 8},
                      bytes_per_block={FULL: 100, "chunked": 300})
    managers = [KVCacheManager(layout) for _ in range(2)]
    shared = SharedBlocks([m.pools[FULL] for m in managers])  # type: ignore[misc]  # each its own BlockPool
    for rank, manager in enumerate(managers):
        manager.share_pool(FULL, shared.view(rank))
    long = seq("long", 7 * BLOCK)
    managers[0].admit(long)
    assert managers[0].allocate(long, 7 * BLOCK)  # 7 global blocks: 4 here, 3 on trunk 1
    table = managers[0].table(long, FULL)
    assert table[:4] == [0, 1, 2, 3] and all(managers[0].pools[FULL].holder(b)[0] == 1 for b in table[4:])
    other = seq("other", 2 * BLOCK)
    managers[1].admit(other)
    assert not managers[1].allocate(other, 2 * BLOCK)  # one global block left in the replica
    assert managers[1].allocate(other, BLOCK)
    managers[0].free(long)
    assert shared.pools[0].used == 0 and shared.pools[1].used == 1


def test_a_pool_is_shared_only_by_a_fresh_manager_without_a_host_tier():
    kv = kv_manager(full=4)
    shared = SharedBlocks([kv.pools[FULL], BlockPool(4)])  # type: ignore[list-item]  # kv's own BlockPool
    s = seq("a", 4)
    kv.admit(s)
    with pytest.raises(RuntimeError, match="before the manager holds any sequence"):
        kv.share_pool(FULL, shared.view(0))
    with pytest.raises(ValueError, match="home has 4 full blocks, this trunk's layout 8"):
        kv_manager(full=8).share_pool(FULL, shared.view(0))
    layout = KVLayout(block_size=BLOCK, chunk_size=CHUNK, num_blocks={FULL: 4, "chunked": 8},
                      bytes_per_block={FULL: 100, "chunked": 300})
    with pytest.raises(ValueError, match="host KV tier"):
        KVCacheManager(layout, host_blocks={FULL: 4, "chunked": 4}).share_pool(FULL, shared.view(0))
