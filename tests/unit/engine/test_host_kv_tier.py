"""The host KV tier on the tiny checkpoints: evicted prefix blocks saved to host memory and restored on a hit, the
tokens and logprobs those of recomputation; per-tenant isolation by counters; a bounded pool."""

from __future__ import annotations

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.host_kv_tier import HostKVTier
from herd.engine.kv_cache_manager import CHUNKED, FULL, KVLayout
from herd.engine.paged_kv import PagedKVCache
from herd.engine.speculative.config import SpeculativeConfig
from herd.model.config import TextConfig
from herd.model.tiny import make_tiny
from herd.model.tiny_eagle3 import make_tiny_eagle3

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
BLOCK = 8  # half the tiny models' attention chunk (16): a hit needs chunked blocks too
SMALL = dict(block_size=BLOCK, max_model_len=128, max_num_seqs=2, max_num_batched_tokens=64)


@pytest.fixture(scope="module", params=["scout", "maverick"])
def tiny(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(request.param), preset=request.param, seed=4)


def _engine(path, *, device_blocks: int = 17, host_mb: float = 1.0, **overrides) -> LLMEngine:
    """An engine whose full-attention pool holds device_blocks blocks of 8 tokens (one max_model_len sequence: 16)."""
    probe = LLMEngine.from_pretrained(path, EngineConfig(**SMALL, kv_cache_mb=1, **overrides))
    sizes = probe.kv.layout.bytes_per_block
    chunked = probe.config.chunked_blocks_needed(probe.model.config, sequences=SMALL["max_num_seqs"])
    mb = (device_blocks * sizes[FULL] + chunked * sizes[CHUNKED]) / 2**20
    return LLMEngine.from_pretrained(path, EngineConfig(**SMALL, kv_cache_mb=mb, host_kv_cache_mb=host_mb,
                                                        **overrides))


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPT = _prompt(0, 61)  # 60 tokens looked up: 7 full blocks of 8 (56 tokens)
OTHERS = [_prompt(seed, 100) for seed in (1, 2)]  # each fills 12+ of the 17 device blocks


def _run(engine: LLMEngine, prompt: list[int], **options):
    out = engine.generate([prompt], PARAMS, **options)[0]
    return out.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs], out.num_cached_tokens


def _all_free(engine: LLMEngine) -> bool:
    return all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def test_a_host_tier_hit_is_exact(tiny):
    recomputed = _run(LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL, enable_prefix_caching=False)), PROMPT)
    plain = _engine(tiny, host_mb=0)
    engine = _engine(tiny)
    first = _run(engine, PROMPT)
    device_hit = _run(engine, PROMPT)
    assert device_hit[2] == 56 and engine.stats().host_kv_hit_blocks == 0, "still on the device: no host hit"
    for other in OTHERS:
        _run(engine, other)
        _run(plain, other)
    saved = engine.stats()
    assert saved.host_kv_saved_bytes > 0 and saved.host_kv_blocks_held > 0, "the evicted blocks went to the host"
    assert not any(engine.kv.pools[FULL].peek_cached(k) for k in engine.kv.host._slots[FULL]), "evicted from device"
    host_hit = _run(engine, PROMPT)
    stats = engine.stats()
    assert host_hit[2] == 56, "the whole cached prefix came back"
    assert stats.host_kv_hit_tokens > 0 and stats.host_kv_hit_blocks > 0
    assert stats.host_kv_restored_bytes > 0
    assert stats.host_kv_hit_blocks > stats.host_kv_hit_tokens // BLOCK, "the resumed chunk's chunked blocks too"
    without_tier = _run(plain, PROMPT)
    assert without_tier[2] == 0, "without the tier the prefix was evicted and recomputed"
    assert host_hit[0] == device_hit[0] == first[0] == without_tier[0] == recomputed[0]
    assert host_hit[1] == device_hit[1], "restored blocks hold exactly what the device cache held"
    # Against recomputation the logprobs agree to float32 rounding, as a device prefix hit's do: the prompt's last
    # rows run in a differently shaped forward than a whole-prompt prefill.
    for ours, theirs in ((host_hit, recomputed), (host_hit, without_tier)):
        for (token, logprob, top), (token2, logprob2, top2) in zip(ours[1], theirs[1], strict=True):
            assert token == token2 and logprob == pytest.approx(logprob2, abs=1e-5)
            assert [t for t, _ in top] == [t for t, _ in top2]
    assert _all_free(engine) and _all_free(plain)


def test_another_tenant_gets_no_host_hit_a_sharing_group_does(tiny):
    engine = _engine(tiny)

    def evict_then_run(**options) -> tuple[int, int]:
        for other in OTHERS:
            _run(engine, other, tenant_id="filler")
        before = engine.stats().host_kv_hit_tokens
        cached = _run(engine, PROMPT, **options)[2]
        return cached, engine.stats().host_kv_hit_tokens - before

    _run(engine, PROMPT, tenant_id="t1")
    assert evict_then_run(tenant_id="t2") == (0, 0), "another tenant must not get t1's host blocks"
    assert evict_then_run(tenant_id="t1") == (56, 56)
    _run(engine, PROMPT, tenant_id="t3", sharing_group="team")
    assert evict_then_run(tenant_id="t4", sharing_group="team")[1] == 56, "a sharing group shares the host tier"
    assert evict_then_run(tenant_id="t5")[1] == 0
    assert _all_free(engine)


def test_the_host_pool_is_bounded_least_recently_used_out(tiny):
    engine = _engine(tiny, host_mb=0.05)
    capacity = engine.stats().host_kv_blocks
    assert 0 < capacity < 12
    _run(engine, PROMPT)
    for seed in range(3, 8):
        _run(engine, _prompt(seed, 100))
        assert engine.stats().host_kv_blocks_held <= capacity
    assert engine.stats().host_kv_blocks_held == capacity
    assert _run(engine, PROMPT)[2] == 0, "PROMPT's blocks were pushed out of the host by later evictions"
    assert engine.stats().host_kv_hit_blocks == 0
    assert _all_free(engine)


def test_host_tier_tensors_mirror_every_layer_tensor_and_move_blocks_both_ways():
    config = TextConfig(hidden_size=16, intermediate_size=8, intermediate_size_mlp=16, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=32,
                        num_local_experts=1, num_experts_per_tok=1, moe_layers=(), use_rope=(True, False),
                        layer_types=("chunked_attention", "full_attention"), attention_chunk_size=8)
    layout = KVLayout(block_size=4, chunk_size=8, num_blocks={FULL: 3, CHUNKED: 3},
                      bytes_per_block={FULL: 32, CHUNKED: 32})
    cache = PagedKVCache(config, layout, dtype=torch.float32, device=torch.device("cpu"))
    tier = HostKVTier(cache, {FULL: 2, CHUNKED: 1})
    for layer in range(2):
        for t in cache.layer_tensors(layer):
            t.copy_(torch.randn_like(t))
    full = cache.groups.index(FULL)
    original = [t[1].clone() for t in cache.layer_tensors(full)]
    tier.save([(FULL, 1, 0)])
    for t in cache.layer_tensors(full):
        t[1] = 0
    tier.restore([(FULL, 0, 2)])
    assert all(torch.equal(t[2], o) for t, o in zip(cache.layer_tensors(full), original, strict=True))
    assert all(not t[1].any() for t in cache.layer_tensors(full)), "only the destination block changed"
    assert tier.nbytes == sum(t[0].nbytes * (2 if g == FULL else 1)
                              for layer, g in enumerate(cache.groups) for t in cache.layer_tensors(layer))


@pytest.mark.parametrize("overrides", [dict(async_scheduling=True), dict(static_decode=True)])
def test_a_host_tier_hit_is_exact_under_async_scheduling_and_static_decode(tiny, overrides):
    reference = _engine(tiny)
    engine = _engine(tiny, **overrides)
    runs = []
    for e in (reference, engine):
        _run(e, PROMPT)
        for other in OTHERS:
            _run(e, other)
        runs.append(_run(e, PROMPT))
    assert runs[1][2] == 56 and engine.stats().host_kv_hit_tokens == reference.stats().host_kv_hit_tokens > 0
    assert runs[1][0] == runs[0][0]  # logprobs to rounding: a padded decode is a differently shaped forward
    assert [lp for _, lp, _ in runs[1][1]] == pytest.approx([lp for _, lp, _ in runs[0][1]], abs=1e-5)
    assert _all_free(engine)


def test_the_host_tier_carries_an_eagle3_heads_layers_too(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("scout-eagle3"), preset="scout", seed=6)
    speculative = SpeculativeConfig(method="eagle3", num_tokens=3, draft_path=str(make_tiny_eagle3(path, seed=6)))
    plain = _engine(path, host_mb=0)
    engine = _engine(path, speculative=speculative)
    host, cache = engine.runner.host, engine.runner.cache
    assert host is not None and len(host.host) == len(cache.groups) > engine.model.config.num_hidden_layers
    expected = _run(plain, PROMPT)[0]
    _run(engine, PROMPT)
    for other in OTHERS:
        _run(engine, other)
    tokens, _, cached = _run(engine, PROMPT)
    assert cached == 56 and engine.stats().host_kv_hit_blocks > 0 and tokens == expected
    assert _all_free(engine)


def test_a_block_evicted_by_a_restore_is_saved_before_it_is_overwritten(tiny):
    engine = _engine(tiny)
    one, two = OTHERS
    first_two = _run(engine, two)
    _run(engine, one)  # evicts two's blocks to the host
    assert _run(engine, two)[2] > 0  # restored into one's blocks, saving them in the same step's moves
    again = _run(engine, one)
    assert again[2] > 0 and engine.stats().host_kv_hit_blocks > 0
    assert _run(engine, two)[0] == first_two[0]
    fresh = _run(_engine(tiny, host_mb=0), one)
    assert again[0] == fresh[0]
    assert [lp for _, lp, _ in again[1]] == pytest.approx([lp for _, lp, _ in fresh[1]], abs=1e-5)


def test_no_tier_when_off_or_without_a_prefix_cache(tiny):
    for engine in (_engine(tiny, host_mb=0), _engine(tiny, enable_prefix_caching=False)):
        assert engine.runner.host is None and engine.kv.host is None
        _run(engine, PROMPT)
        stats = engine.stats()
        assert (stats.host_kv_blocks, stats.host_kv_blocks_held, stats.host_kv_saved_bytes) == (0, 0, 0)
    with pytest.raises(ValueError, match="host_kv_cache_mb"):
        EngineConfig(host_kv_cache_mb=-1)
