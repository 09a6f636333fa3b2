"""The engine on the tiny checkpoints: exact greedy, batch invariance, blocks, tenants, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import Llama4ForConditionalGeneration

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.model.tiny import make_tiny

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SMALL = dict(kv_cache_mb=16, max_num_seqs=32)


@pytest.fixture(scope="module", params=["scout", "maverick"])
def tiny(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(request.param), preset=request.param, seed=1)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=2)


def _prompts(count, seed, vocab=400, low=3, high=90):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _all_blocks_free(engine):
    return all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def test_greedy_equals_transformers(tiny):
    reference = Llama4ForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).language_model.eval()
    prompts = [p[:n] for p, n in zip(_prompts(4, 0, high=100), (5, 15, 40, 70), strict=True)]  # chunk is 16
    engine = LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL, max_num_batched_tokens=48))
    outputs = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt])
        expected = reference.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.token_ids == expected[0, len(prompt) :].tolist(), f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"
    assert _all_blocks_free(engine)


def test_batch_invariance_alone_batched_and_from_the_prefix_cache(scout):
    prompts = _prompts(16, 1)
    prompts[5] = prompts[2][:40] + prompts[5]  # shared prefixes within the batch
    prompts[9] = prompts[2][:33] + prompts[9][:10]
    alone_engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, enable_prefix_caching=False))
    alone = [alone_engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, max_num_batched_tokens=40))
    batched = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in batched] == alone
    again = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in again] == alone
    assert sum(o.num_cached_tokens > 0 for o in again) >= 14
    assert _all_blocks_free(engine)


def test_every_block_returns_after_finish_and_abort(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, max_num_batched_tokens=32))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=30)) for p in _prompts(10, 2)]
    for _ in range(4):
        engine.step()
    assert not _all_blocks_free(engine)
    aborted = ids[::3]
    for rid in aborted:
        assert engine.abort(rid)
    assert not engine.abort(aborted[0]), "aborting twice is a no-op"
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert {rid for rid, r in finished.items() if r == "abort"} == set(aborted)
    assert len(finished) == len(ids)
    assert _all_blocks_free(engine)


def test_preempted_sequences_recompute_to_the_same_tokens(scout):
    prompts = _prompts(8, 8, low=18, high=22)
    reference = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    expected = [o.token_ids for o in reference.generate(prompts, GREEDY)]
    tight = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128)
    sizes = EngineConfig(**tight).kv_layout(reference.model.config).bytes_per_block
    # Room for 12 blocks of 16 tokens in each group (the pools split evenly below every window's worth),
    # while 8 sequences growing to ~44 tokens need 24 global blocks and up to 16 chunked ones.
    config = EngineConfig(**tight, kv_cache_mb=12 * (sizes["chunked"] + sizes["full"]) / 2**20)
    engine = LLMEngine(reference.model, reference.tokenizer, config)
    assert engine.kv.layout.num_blocks == {"chunked": 12, "full": 12}
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
    assert engine.scheduler.num_preemptions > 0
    assert _all_blocks_free(engine)
    one_window = config.chunked_blocks_needed(reference.model.config, sequences=1) * sizes["chunked"]
    with pytest.raises(ValueError, match="holds 0 global blocks"):
        LLMEngine(reference.model, reference.tokenizer, EngineConfig(**tight, kv_cache_mb=one_window / 2**20))
    with pytest.raises(ValueError, match="too small for the chunked layers' windows"):
        LLMEngine(reference.model, reference.tokenizer, EngineConfig(**tight, kv_cache_mb=(one_window - 1) / 2**20))


def test_prefix_cache_is_shared_within_a_tenant_or_group_only(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    prompt = _prompts(1, 3, low=60, high=61)[0]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def cached(tenant, group=None):
        return engine.generate([prompt], params, tenant_id=tenant, sharing_group=group)[0].num_cached_tokens

    assert cached("t1") == 0
    assert cached("t2") == 0, "another tenant must not reuse (or time) t1's prefix"
    assert cached("t1") == 48, "the same tenant reuses its own prefix (3 full blocks of 16)"
    assert cached("t3", "team") == 0
    assert cached("t4", "team") == 48, "tenants that opted into one sharing group share"
    assert cached("t5") == 0


def test_bad_requests_raise_and_leave_the_batch_alone(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, max_model_len=128))
    good = _prompts(1, 4, low=30, high=31)[0]
    expected = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL)).generate([good], GREEDY)[0].token_ids
    rid = engine.add_request(good, GREEDY)
    engine.step()
    bad = [
        (lambda: engine.add_request("", GREEDY), "prompt is empty"),
        (lambda: engine.add_request([], GREEDY), "prompt is empty"),
        (lambda: engine.add_request(list(range(128)), GREEDY), "context limit is 128"),
        (lambda: engine.add_request([1, 2, 99999], GREEDY), "outside the vocabulary"),
        (lambda: engine.add_request(good, SamplingParams(max_tokens=0)), "max_tokens"),
        (lambda: engine.add_request(good, SamplingParams(top_p=1.5)), "top_p"),
        (lambda: engine.add_request(good, SamplingParams(top_p=0.0)), "top_p"),
        (lambda: engine.add_request(good, SamplingParams(stop=5)), "stop must be a string or a list"),
        (lambda: engine.add_request(good, GREEDY, request_id=rid), "already in use"),
        (lambda: engine.add_request(good, GREEDY, tenant_weight=0), "tenant_weight"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
    outputs = {}
    while engine.has_unfinished():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(outputs) == [rid] and outputs[rid].token_ids == expected


def test_stop_tokens_stop_strings_and_lengths(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    prompt = _prompts(1, 5, low=20, high=21)[0]
    free_run = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    stop_token = free_run.token_ids[6]
    by_token = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_token],
                                                        ignore_eos=True))[0]
    first = free_run.token_ids.index(stop_token)
    assert by_token.finish_reason == "stop" and by_token.token_ids == free_run.token_ids[: first + 1]
    text = free_run.text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    by_string = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                         ignore_eos=True))[0]
    assert by_string.finish_reason == "stop"
    assert by_string.text == text[: text.index(stop)]
    kept = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=stop,
                                                    include_stop_str_in_output=True, ignore_eos=True))[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    assert engine.generate([prompt], SamplingParams(temperature=0, max_tokens=3))[0].finish_reason in {"length", "stop"}
    assert _all_blocks_free(engine)


def test_streamed_stop_string_spanning_tokens_is_never_taken_back(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    prompt = _prompts(1, 5, low=20, high=21)[0]
    free_run = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = free_run.text
    stop = next(text[i : i + 7] for i in range(8, len(text) - 7) if "\ufffd" not in text[i : i + 7])
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=30, stop=["never there", stop],
                                              ignore_eos=True), request_id="streamed")
    pieces, texts = [], []
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.delta_text)
            texts.append(out.text)
    assert out.finish_reason == "stop"
    assert out.text == "".join(pieces) == text[: text.index(stop)]
    assert all(out.text.startswith(seen) for seen in texts)


def test_seeded_sampling_repeats_alone_and_in_a_batch(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    prompts = _prompts(6, 6)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = engine.generate([prompts[0]], seeded)[0].token_ids
    batch = engine.generate(prompts, [seeded] + [SamplingParams(temperature=1.0, max_tokens=12)] * 5)
    assert batch[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=12, ignore_eos=True)
    assert engine.generate([prompts[0]], other_seed)[0].token_ids != alone


def test_logprobs_are_the_models(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    prompt = _prompts(1, 7, low=10, high=11)[0]
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True))[0]
    logits = engine.model.logits(torch.tensor(prompt))[-1]
    first = out.logprobs[0]
    expected = torch.log_softmax(logits, -1)
    assert first.token_id == out.token_ids[0] == int(expected.argmax())
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert [t for t, _ in first.top] == torch.topk(expected, 2).indices.tolist()


def test_the_engine_hands_its_static_decode_setting_to_the_runner(scout):
    prompts = _prompts(5, 7)
    plain = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    static = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, static_decode=True, decode_buckets=[2, 8]))
    assert plain.runner.static is None and static.runner.static is not None
    want = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    assert [o.token_ids for o in static.generate(prompts, GREEDY)] == want
