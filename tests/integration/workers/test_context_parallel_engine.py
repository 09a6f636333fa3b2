"""Context parallelism in the engine, on gloo: two trunks' engines (threads of this process, each its own copy of the
tiny model, experts in the trunk) share their global-layer blocks, so one sequence longer than a trunk's cache holds is
served with its global KV split between the two, and its tokens and log-probabilities equal one engine's with room
for all of it. A peer's part really counts: dropping the answers makes the comparison fail."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bench.context_parallel import kv_mb
from bench.lora import wide_checkpoint
from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine import context_parallel as cp_module
from herd.engine.errors import SamplingError
from herd.engine.speculative.config import SpeculativeConfig
from herd.engine.trunk_group import TrunkGroup
from herd.model import load_config
from herd.model.tiny import make_tiny
from herd.workers.collective import CollectiveGroup, open_rendezvous

TIMEOUT_S = 60.0
# Tiny Scout: layers 0-2 chunked (chunk 16), layer 3 global; block 16, float32. These bytes give each trunk 6 chunked
# blocks and 8 global ones (128 tokens), so a sequence of 200 tokens must take global blocks of the other trunk.
SMALL = dict(kv_cache_mb=212992 / 2**20, max_num_seqs=2, max_num_batched_tokens=32, max_model_len=224)
LONG, SHORT = 180, 40
FP8_KV_BYTES = 6 * 3 * 2304 + 8 * 2304  # an FP8 block of one layer: 2 x 16 tokens x 2 heads x (32 bytes + a scale)


@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    return {preset: make_tiny(tmp_path_factory.mktemp(preset), preset=preset, seed=3) for preset in ("scout",
                                                                                                     "maverick")}


@pytest.fixture(scope="module")
def tiny(tinies):
    return tinies["scout"]


def _links(trunks: int) -> list[CollectiveGroup]:
    store, rendezvous = open_rendezvous("127.0.0.1", trunks, backend="gloo", timeout_s=TIMEOUT_S)
    with ThreadPoolExecutor(trunks) as pool:
        return list(pool.map(lambda r: CollectiveGroup(rendezvous, r, store=store if r == 0 else None), range(trunks)))


def _group(tiny, trunks: int = 2, **config) -> tuple[TrunkGroup, list[CollectiveGroup]]:
    links = _links(trunks)
    settings = {**SMALL, "context_parallel": trunks, **config}
    engines = [LLMEngine.from_pretrained(tiny, EngineConfig(**settings)) for _ in links]
    return TrunkGroup(engines, links=links, timeout_s=TIMEOUT_S), links


def _prompt(seed: int, tokens: int) -> list[int]:
    return torch.randint(3, 120, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def _params(prompt_logprobs: int | None = 2) -> SamplingParams:
    """Greedy, with log-probabilities (prompt ones: a prompt owed them takes no prefix-cache hit)."""
    return SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3, prompt_logprobs=prompt_logprobs)


def _reference(tiny, prompts, max_model_len: int = 224, kv_cache_dtype: str = "auto"):
    engine = LLMEngine.from_pretrained(tiny, EngineConfig(max_num_seqs=2, max_num_batched_tokens=32,
                                                          max_model_len=max_model_len, kv_cache_dtype=kv_cache_dtype))
    return engine.generate(prompts, _params())


def _run(group: TrunkGroup, prompts):
    """The long request on trunk 0, then the short one (on trunk 1) while the long one decodes; the final outputs,
    and the most global blocks trunk 1 held while it had no sequence of its own (all of them trunk 0's)."""
    ids = [group.add_request(prompts[0], _params())]
    trunks = [group.trunk_of(ids[0])]
    lent = 0
    final = {}
    while group.has_unfinished():
        final.update((out.request_id, out) for out in group.step() if out.finished)
        if len(ids) == 1:
            lent = max(lent, group.engines[1].stats().kv_blocks_used["full"])
            running = group.engines[0].scheduler.running
            if running and running[0].num_computed > LONG:
                ids.append(group.add_request(prompts[1], _params()))
                trunks.append(group.trunk_of(ids[1]))
    assert trunks == [0, 1]
    return [final[rid] for rid in ids], lent


def _assert_same(got, expected):
    for g, e in zip(got, expected, strict=True):
        assert g.token_ids == e.token_ids
        torch.testing.assert_close([t.logprob for t in g.logprobs], [t.logprob for t in e.logprobs],
                                   rtol=1e-4, atol=1e-4)
        assert [[i for i, _ in t.top] for t in g.logprobs] == [[i for i, _ in t.top] for t in e.logprobs]
        if g.prompt_logprobs is not None:
            torch.testing.assert_close([t.logprob for t in g.prompt_logprobs[1:]],
                                       [t.logprob for t in e.prompt_logprobs[1:]], rtol=1e-4, atol=1e-4)


def test_one_trunk_cannot_hold_the_long_sequence(tiny):
    with pytest.raises(ValueError, match="holds 8 global blocks; one sequence of max_model_len 224 needs 14"):
        LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL))


@pytest.mark.parametrize(("preset", "micro_batches", "seed", "max_keys", "kv"),
                         [("scout", 1, 0, None, "auto"), ("maverick", 2, 1, 32, "auto"), ("scout", 1, 2, None, "fp8")])
def test_a_sequence_longer_than_a_trunk_is_exact_with_its_global_kv_on_both(tinies, monkeypatch, preset,
                                                                            micro_batches, seed, max_keys, kv):
    """Both presets; with and without ping-pong micro-batches; with partial attentions of 32 keys at a time (and of
    512 scores: a prefill chunk's 32 queries x 4 heads see 4 keys at a time); and with the FP8 cache (keys shipped to
    the holder are quantised there as at home: the same bytes either way)."""
    tiny = tinies[preset]
    if max_keys is not None:
        monkeypatch.setattr(cp_module, "MAX_KEYS", max_keys)
        monkeypatch.setattr(cp_module, "MAX_SCORES", 512)
    prompts = [_prompt(seed, LONG), _prompt(seed + 10, SHORT)]
    expected = _reference(tiny, prompts, kv_cache_dtype=kv)
    fp8 = {"kv_cache_mb": FP8_KV_BYTES / 2**20} if kv == "fp8" else {}  # again 8 global blocks a trunk
    group, links = _group(tiny, micro_batches=micro_batches, kv_cache_dtype=kv, **fp8)
    try:
        got, lent = _run(group, prompts)
        _assert_same(got, expected)
        assert lent >= -(-LONG // 16) - 8  # the long prompt's global blocks past trunk 0's 8 are trunk 1's
        assert group.stats().kv_blocks_held == 0  # every block back, on both trunks

        # The same prompt again: its cached global blocks, on both trunks, are a prefix hit wherever it runs.
        again = group.generate([prompts[0]], _params(prompt_logprobs=None))[0]
        assert again.num_cached_tokens >= LONG // 16 * 16 - 16 > 8 * 16
        _assert_same([again], expected[:1])
    finally:
        group.close()
        for link in links:
            link.close()


def test_with_two_global_layers_the_blocks_travel_once_and_quiet_pairs_skip_the_later_layer(tmp_path):
    """8 layers (3 and 7 global): the peers keep the blocks sent at layer 3 for layer 7, the long sequence is exact,
    and while nothing is spread the trunks exchange headers at layer 3 alone."""
    path = wide_checkpoint(tmp_path / "deep", argparse.Namespace(
        preset="scout", hidden_size=128, intermediate_size=64, intermediate_size_mlp=128, layers=8, head_dim=32))
    text = load_config(path).text
    assert [i for i in range(8) if text.chunk_size(i) is None] == [3, 7]
    shape = dict(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=224)
    mb = kv_mb(text, {**shape, "context_parallel": 2}, 8)  # 8 global blocks a trunk, as SMALL gives the tiny one
    links = _links(2)
    sent: list[int] = []
    for link in links:
        send = link.send
        link.send = lambda tensor, to, tag, send=send: sent.append(tag) or send(tensor, to, tag)  # type: ignore
    group = TrunkGroup([LLMEngine.from_pretrained(path, EngineConfig(**shape, kv_cache_mb=mb, context_parallel=2))
                        for _ in links], links=links, timeout_s=TIMEOUT_S)
    reference = LLMEngine.from_pretrained(path, EngineConfig(**shape))
    try:
        short = _prompt(6, SHORT)
        assert group.generate([short], _params())[0].token_ids == reference.generate([short], _params())[0].token_ids
        headers = {cp_module.tag(layer, cp_module.Purpose.HEADER) for layer in (3, 7)}
        assert {t for t in sent if t in headers} == {cp_module.tag(3, cp_module.Purpose.HEADER)}  # 7 stays quiet
        sent.clear()
        long = _prompt(7, LONG)
        _assert_same(group.generate([long], _params()), reference.generate([long], _params()))
        assert cp_module.tag(7, cp_module.Purpose.HEADER) in sent
        blocks = [t for t in sent if t in {cp_module.tag(layer, cp_module.Purpose.KEY_BLOCKS) for layer in (3, 7)}]
        assert blocks and set(blocks) == {cp_module.tag(3, cp_module.Purpose.KEY_BLOCKS)}  # once a forward
    finally:
        group.close()
        for link in links:
            link.close()


def test_three_trunks_hold_one_sequence_between_them(tiny):
    """300 prompt tokens and 20 new: 20 global blocks, 8 here and the rest on both peers."""
    prompt = _prompt(2, 300)
    (expected,) = _reference(tiny, [prompt], max_model_len=384)
    group, links = _group(tiny, trunks=3, max_model_len=384)
    try:
        rid = group.add_request(prompt, _params())
        held, final = [0, 0, 0], None
        while group.has_unfinished():
            final = next((out for out in group.step() if out.finished), final)
            held = [max(h, e.stats().kv_blocks_used["full"]) for h, e in zip(held, group.engines, strict=True)]
        assert final is not None and final.request_id == rid
        _assert_same([final], [expected])
        assert held[0] == 8 and held[1] > 0 and held[2] > 0 and sum(held) >= 300 // 16 + 1
    finally:
        group.close()
        for link in links:
            link.close()


def test_draft_tokens_of_a_spread_sequence_are_verified_exactly(tiny):
    """Prompt lookup's drafts on the long sequence: its verifying chunks attend through the exchange too."""
    prompt = torch.randint(3, 500, (LONG,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = LLMEngine.from_pretrained(tiny, EngineConfig(max_num_seqs=2, max_num_batched_tokens=32,
                                                            max_model_len=224)).generate([prompt], params)
    group, links = _group(tiny, speculative=SpeculativeConfig(method="ngram", num_tokens=4,
                                                                prompt_lookup_min=1))  # one token seen before: a draft
    try:
        (got,) = group.generate([prompt], params)
        assert got.token_ids == expected[0].token_ids
        assert got.draft_tokens > 0 and group.engines[1].stats().kv_blocks_used["full"] == 0
    finally:
        group.close()
        for link in links:
            link.close()


def test_without_the_peers_answers_the_long_sequence_goes_wrong(tiny, monkeypatch):
    prompts = [_prompt(0, LONG), _prompt(1, SHORT)]
    expected = _reference(tiny, prompts)
    merge = cp_module.merge_partials
    monkeypatch.setattr(cp_module, "merge_partials", lambda parts: merge(parts[:1]))  # the home part alone
    group, links = _group(tiny)
    try:
        got, _ = _run(group, prompts)
        with pytest.raises(AssertionError):
            _assert_same(got[:1], expected[:1])
    finally:
        group.close()
        for link in links:
            link.close()


def test_a_trunk_gone_fails_the_long_request_at_once_and_frees_its_blocks(tiny):
    """Trunk 1's link breaks while trunk 0's sequence holds blocks there: the exchange fails, the request ends with
    UNAVAILABLE / experts_lost (the gateway continues it elsewhere; the replica restarts), no hang."""
    group, links = _group(tiny)
    try:
        rid = group.add_request(_prompt(4, LONG), _params())
        while group.engines[1].stats().kv_blocks_used["full"] == 0:
            group.step()
        links[1].close()
        final = None
        while group.has_unfinished():
            final = next((out for out in group.step() if out.finished), final)
        assert final is not None and final.request_id == rid and final.finish_reason == "error"
        assert final.error.code.value == "UNAVAILABLE" and final.error.reason == "experts_lost"
        assert group.stats().kv_blocks_held == 0
    finally:
        group.close()
        links[0].close()


def test_context_parallelism_refuses_what_it_cannot_serve(tiny):
    group, links = _group(tiny)
    try:
        with pytest.raises(SamplingError, match="n > 1 and best_of > 1") as refused:
            group.add_request([5, 6, 7], SamplingParams(n=2))
        assert refused.value.field == "n"
    finally:
        group.close()
        for link in links:
            link.close()
    with pytest.raises(ValueError, match="needs a link for each"):
        TrunkGroup([LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL, context_parallel=2)) for _ in range(2)])
    with pytest.raises(ValueError, match="host KV tier"):
        EngineConfig(context_parallel=2, host_kv_cache_mb=1)
