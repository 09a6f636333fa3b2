"""Block tables: chunked layers keep one chunk, global layers everything; the prefix cache by salt."""

from __future__ import annotations

from herd.engine.kv_cache_manager import CHUNKED, FULL
from tests.unit.engine.fakes import BLOCK, CHUNK, kv_manager, seq


def _compute(kv, s, n):
    assert kv.allocate(s, n)
    s.num_computed += n
    kv.on_computed(s)


def test_chunked_layers_release_passed_chunks_global_layers_keep_all():
    kv = kv_manager()
    s = seq("a", 4 * CHUNK)
    kv.admit(s)
    for _ in range(4 * CHUNK // 3 + 1):  # uneven steps cross every boundary mid-step
        n = min(3, s.num_known - s.num_computed)
        if n:
            _compute(kv, s, n)
    assert s.num_computed == 4 * CHUNK
    held = kv.blocks_held(s)
    assert held[FULL] == 4 * CHUNK // BLOCK  # every token
    assert held[CHUNKED] == 0, "computed exactly to a chunk boundary: the next chunk is empty"
    s.output_ids.append(5)
    _compute(kv, s, 1)
    assert kv.blocks_held(s)[CHUNKED] == 1
    assert kv.table(s, CHUNKED)[: 4 * CHUNK // BLOCK] == [None] * (4 * CHUNK // BLOCK)
    assert kv.bytes_held(s) == 33 // BLOCK * 100 + 100 + 300  # 9 global blocks, 1 chunked
    assert kv.full_cache_bytes(33) == 9 * 400


def test_a_step_that_crosses_a_chunk_boundary_keeps_the_old_chunk_until_it_is_computed():
    kv = kv_manager()
    s = seq("a", 20)
    kv.admit(s)
    _compute(kv, s, 6)  # positions 0..5
    assert kv.allocate(s, 6)  # positions 6..11 cross the boundary at 8: chunk 0's blocks still needed
    assert kv.table(s, CHUNKED)[0] is not None
    s.num_computed += 6
    kv.on_computed(s)
    assert kv.table(s, CHUNKED)[:2] == [None, None]


def test_free_returns_every_block():
    kv = kv_manager(full=20, chunked=20)
    seqs = [seq(str(i), 10 + i) for i in range(3)]
    for s in seqs:
        kv.admit(s)
        _compute(kv, s, s.num_known)
    for s in seqs:
        kv.free(s)
    assert kv.num_free(FULL) == 20 and kv.num_free(CHUNKED) == 20


def test_allocation_is_all_or_nothing():
    kv = kv_manager(full=3, chunked=8)
    s = seq("a", 16)
    kv.admit(s)
    assert not kv.allocate(s, 16)  # needs 4 global blocks, pool has 3
    assert kv.num_free(FULL) == 3 and kv.num_free(CHUNKED) == 8


def test_prefix_hit_takes_global_blocks_and_only_the_resumed_chunk():
    kv = kv_manager()
    first = seq("a", 22)
    kv.admit(first)
    _compute(kv, first, 22)
    kv.free(first)  # blocks stay cached while free
    again = seq("b", 22)
    kv.admit(again)
    assert again.num_computed == 20  # 5 full blocks of the 21 tokens that may come from cache
    assert kv.blocks_held(again) == {FULL: 5, CHUNKED: 1}  # chunk 2 starts at 16: block 4 only
    assert kv.allocate(again, 2)


def test_prefix_cache_is_salted_per_tenant():
    kv = kv_manager()
    a = seq("a", 16, tenant="t1")
    kv.admit(a)
    _compute(kv, a, 16)
    other_tenant = seq("b", 16, tenant="t2")
    kv.admit(other_tenant)
    assert other_tenant.num_computed == 0
    same_tenant = seq("c", 16, tenant="t1")
    kv.admit(same_tenant)
    assert same_tenant.num_computed == 12


def test_a_hit_needs_the_chunk_blocks_of_its_window():
    kv = kv_manager(chunked=64)
    a = seq("a", 30)
    kv.admit(a)
    _compute(kv, a, 30)
    kv.free(a)
    # Evict the cached chunked blocks by allocating the whole chunked pool to someone else.
    hog = seq("hog", 64 * BLOCK, first_token=1000)
    kv.admit(hog)
    assert kv.allocate(hog, CHUNK)  # takes chunked blocks, least recently freed first
    while kv.num_free(CHUNKED):
        kv.pools[CHUNKED].allocate()
    b = seq("b", 30)
    kv.admit(b)
    # Global blocks are still cached but the chunk-3 window's block is gone: the usable prefix ends at
    # a chunk boundary (position 24), where the chunked layers need no blocks.
    assert b.num_computed == 24
    assert kv.blocks_held(b) == {FULL: 6, CHUNKED: 0}


def test_a_fork_shares_every_block_and_copies_the_partial_one_before_writing_it():
    kv = kv_manager(full=20, chunked=20)
    parent = seq("p", 10)  # blocks [0, 4) [4, 8) full, [8, 10) partial; chunk 1 is [8, 16)
    kv.admit(parent)
    _compute(kv, parent, 10)
    child = seq("c", 10)
    kv.fork(parent, child)
    assert child.num_computed == 10 and kv.table(child, FULL) == kv.table(parent, FULL)
    used = {g: 20 - kv.num_free(g) for g in (FULL, CHUNKED)}
    assert used == {FULL: 3, CHUNKED: 1}, "the fork took no block"
    partial_full, partial_chunked = kv.table(parent, FULL)[2], kv.table(parent, CHUNKED)[2]
    child.output_ids.append(5)
    assert kv.allocate(child, 1)  # writes position 10, in the shared partial block
    assert kv.table(child, FULL)[:2] == kv.table(parent, FULL)[:2]
    assert kv.table(child, FULL)[2] != partial_full and kv.table(child, CHUNKED)[2] != partial_chunked
    assert sorted(kv.take_copies()) == sorted([(FULL, partial_full, kv.table(child, FULL)[2]),
                                               (CHUNKED, partial_chunked, kv.table(child, CHUNKED)[2])])
    assert kv.take_copies() == []
    parent.output_ids.append(6)
    assert kv.allocate(parent, 1) and kv.table(parent, FULL)[2] == partial_full, "the last holder writes in place"
    assert kv.take_copies() == []
    kv.free(parent)
    kv.free(child)
    assert kv.num_free(FULL) == 20 and kv.num_free(CHUNKED) == 20


def test_copy_on_write_is_all_or_nothing():
    kv = kv_manager(full=3, chunked=8)
    parent = seq("p", 10)
    kv.admit(parent)
    _compute(kv, parent, 10)  # every global block in use
    child = seq("c", 10)
    kv.fork(parent, child)
    child.output_ids.append(5)
    assert not kv.allocate(child, 1)
    assert kv.take_copies() == [] and kv.table(child, FULL) == kv.table(parent, FULL)


def test_uncache_drops_what_a_failed_step_registered_and_keeps_what_came_before():
    kv = kv_manager()
    a = seq("a", 20)
    kv.admit(a)
    _compute(kv, a, 6)  # block 0 full: cached by a step that succeeded
    assert kv.allocate(a, 10)
    a.num_computed += 10
    registered = kv.on_computed(a)  # blocks 1..3 (block 1 partly filled before), chunk 0 released
    assert sorted(kv.table(a, FULL).index(b) for g, b, _ in registered if g == FULL) == [1, 2, 3]
    assert len([r for r in registered if r[0] == CHUNKED]) == 3
    dropped = kv.uncache(registered)
    assert dropped == {(g, b) for g, b, _ in registered}
    assert kv.uncache(registered) == set()  # undone once
    assert kv.holds_any(a, dropped)
    kv.free(a)
    b = seq("b", 20)
    kv.admit(b)
    assert b.num_computed == BLOCK  # only block 0 is found
    assert not kv.holds_any(b, dropped)
    assert sum(len(p.cached_hashes()) for p in kv.pools.values()) == 2  # block 0 of each group
