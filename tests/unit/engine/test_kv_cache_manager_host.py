"""KVCacheManager with a host tier: evictions listed as saves, host hits as restores into fresh blocks, only with
room on the device; no model (moves are listed, not made)."""

from __future__ import annotations

from herd.engine.kv_cache_manager import CHUNKED, FULL, KVCacheManager, KVLayout
from tests.unit.engine.fakes import BLOCK, CHUNK, seq


def _manager(blocks: int = 4, host: int = 4) -> KVCacheManager:
    layout = KVLayout(block_size=BLOCK, chunk_size=CHUNK, num_blocks={FULL: blocks, CHUNKED: blocks},
                      bytes_per_block={FULL: 100, CHUNKED: 300})
    return KVCacheManager(layout, host_blocks={FULL: host, CHUNKED: host})


def _compute_prompt(kv: KVCacheManager, s) -> None:
    """Admit s and compute its whole prompt in one step, as the scheduler and engine would."""
    kv.admit(s)
    assert kv.allocate(s, len(s.prompt_ids) - s.num_computed)
    s.num_computed = len(s.prompt_ids)
    kv.on_computed(s)


def test_evicted_blocks_are_saved_and_a_later_hit_restores_them_into_fresh_blocks() -> None:
    kv = _manager()
    a = seq("a", 13)  # 12 tokens looked up: 3 blocks of 4; chunk 8: block 2 is the resumed chunk's
    _compute_prompt(kv, a)
    kv.free(a)
    assert kv.take_host_moves() == ([], [])
    b = seq("b", 16, first_token=100)
    _compute_prompt(kv, b)  # 4 full blocks: every cached block of a's is reused
    saves, restores = kv.take_host_moves()
    assert sorted(g for g, _, _ in saves) == [CHUNKED] * 3 + [FULL] * 3 and not restores  # chunked 0, 1 cached too
    assert kv.host_saved_bytes == 3 * 100 + 3 * 300
    kv.free(b)
    again = seq("a2", 13)
    kv.admit(again)
    assert again.num_computed == 12 and kv.host_hit_tokens == 12
    saves, restores = kv.take_host_moves()
    table = kv.table(again, FULL)
    assert [(g, blk) for g, _, blk in restores if g == FULL] == [(FULL, blk) for blk in table]
    assert [g for g, _, _ in restores].count(CHUNKED) == 1 and kv.table(again, CHUNKED)[:2] == [None, None]
    assert kv.host_hit_blocks == 4 and kv.host_restored_bytes == 3 * 100 + 300
    # The restores reused b's cached blocks: those were saved first (the runner makes saves before restores).
    assert {blk for _, blk, _ in saves} >= {blk for g, _, blk in restores if g == FULL}


def test_a_host_hit_needs_free_device_blocks_for_its_restores() -> None:
    kv = _manager()
    a = seq("a", 13)
    _compute_prompt(kv, a)
    kv.free(a)
    b = seq("b", 16, first_token=100)
    _compute_prompt(kv, b)  # holds every full block
    kv.take_host_moves()
    again = seq("a2", 13)
    kv.admit(again)
    assert again.num_computed == 0 and kv.take_host_moves() == ([], []), "no room: no restore, recompute"
    assert kv.host_hit_blocks == 0


def test_another_salt_finds_nothing_on_the_host() -> None:
    kv = _manager()
    a = seq("a", 13, tenant="t1")
    _compute_prompt(kv, a)
    kv.free(a)
    b = seq("b", 16, first_token=100)
    _compute_prompt(kv, b)
    kv.free(b)
    other = seq("a2", 13, tenant="t2")
    kv.admit(other)
    assert other.num_computed == 0 and kv.host_hit_blocks == 0


def test_a_host_hit_shrinks_to_the_free_device_blocks() -> None:
    kv = _manager(host=8)
    a = seq("a", 13)
    _compute_prompt(kv, a)
    kv.free(a)
    b = seq("b", 16, first_token=100)
    _compute_prompt(kv, b)
    kv.free(b)
    c = seq("c", 5, first_token=200)
    _compute_prompt(kv, c)  # holds 2 of the 4 full blocks
    kv.take_host_moves()
    again = seq("a2", 13)
    kv.admit(again)
    assert again.num_computed == 8, "room for 2 of the 3 host blocks"
    _, restores = kv.take_host_moves()
    assert [g for g, _, _ in restores] == [FULL, FULL] and kv.num_free(FULL) == 0
