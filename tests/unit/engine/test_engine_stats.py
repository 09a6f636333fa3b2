"""LLMEngine.stats() and abort_all(): what a replica reads of its engine, without reaching into it."""

from __future__ import annotations

import pytest

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.model.tiny import make_tiny


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=5)
    return LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=8, max_num_seqs=2, max_num_batched_tokens=64))


def test_stats_count_requests_blocks_and_prefix_lookups(engine):
    idle = engine.stats()
    assert (idle.running, idle.waiting, idle.kv_blocks_held) == (0, 0, 0)
    assert set(idle.kv_blocks) == {"chunked", "full"} and all(n > 0 for n in idle.kv_blocks.values())
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    for start in (1, 100, 200):
        engine.add_request(list(range(start, start + 20)), params)
    engine.step()
    busy = engine.stats()
    assert (busy.running, busy.waiting) == (2, 1), "max_num_seqs 2: the third waits"
    # 20 prompt tokens in 16-token blocks: 2 full-attention blocks each, and 1 chunked one (the 16-token attention
    # chunk's window: positions 16..19; the first block is freed once the window moves past it).
    assert busy.kv_blocks_used == {"chunked": 2, "full": 4} and busy.kv_blocks_held == 6
    assert busy.prefix_queried_tokens == 2 * 19 and busy.prefix_hit_tokens == 0  # a prompt's last token is computed
    assert engine.abort_all() == 3
    engine.step()
    after = engine.stats()
    assert (after.running, after.waiting, after.kv_blocks_held) == (0, 0, 0)
    assert not engine.has_unfinished() and engine.abort_all() == 0
