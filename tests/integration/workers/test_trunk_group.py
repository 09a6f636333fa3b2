"""A replica's 2 trunks stepping in lockstep over 2 expert shards (issue 28's M:N with the engine): requests spread
over the trunks, each trunk its own scheduler and KV cache, every step of both at once (an idle trunk's empty
micro-batches keep the shards in step); the tokens are the single-process engine's, with and without ping-pong."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.async_engine import AsyncLLMEngine
from herd.engine.errors import Code
from herd.engine.fault_hold import EXPERTS_LOST
from herd.engine.trunk_group import TrunkGroup
from herd.model import load_model
from herd.model.tiny import make_tiny
from herd.model.tokenizer import Tokenizer
from tests.integration.workers.test_collective_m_to_n import MtoN

CONFIG = dict(kv_cache_mb=16, max_num_seqs=8, max_num_batched_tokens=48)


@pytest.fixture(scope="module", params=["scout", "maverick"])
def replica(request, tmp_path_factory):
    preset = request.param
    path = make_tiny(tmp_path_factory.mktemp(preset), preset=preset, seed=9)
    with MtoN(path, preset) as group:
        yield path, group
    assert not group.errors, "no shard failed"


def _prompts() -> list[list[int]]:
    return [torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in (5, 41, 12, 27, 8, 19)]


def _params() -> list[SamplingParams]:
    """Different lengths (a trunk runs out of work before the other), a seeded draw and prompt logprobs."""
    return [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 12, 7, 10)] + [
        SamplingParams(temperature=1.0, seed=4, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=1)]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_two_trunks_give_the_single_process_engines_outputs(replica, micro_batches):
    path, group = replica
    tokenizer = Tokenizer.from_pretrained(path)
    alone = LLMEngine(load_model(path, progress=False), tokenizer, EngineConfig(**CONFIG))
    expected = [alone.generate([p], sp)[0] for p, sp in zip(_prompts(), _params(), strict=True)]
    engines = [LLMEngine(model, tokenizer, EngineConfig(**CONFIG, micro_batches=micro_batches))
               for model, _ in group.trunks]
    trunks = TrunkGroup(engines)
    try:
        ids = [trunks.add_request(p, sp) for p, sp in zip(_prompts(), _params(), strict=True)]
        owners = {trunks.trunk_of(rid) for rid in ids}
        assert owners == {0, 1}, "requests are spread over both trunks"
        final = {}
        steps = 0
        while trunks.has_unfinished():
            final.update((out.request_id, out) for out in trunks.step() if out.finished)
            steps += 1
        got = [final[rid] for rid in ids]
    finally:
        trunks.close()
    for mine, reference in zip(got, expected, strict=True):
        assert mine.token_ids == reference.token_ids
    scored = [(a, b) for a, b in zip(got[-1].prompt_logprobs, expected[-1].prompt_logprobs, strict=True) if a]
    assert scored and all(abs(a.logprob - b.logprob) < 1e-4 for a, b in scored)
    for engine in engines:
        assert engine.stats().kv_blocks_held == 0  # every block back on both trunks


def test_one_request_runs_on_one_trunk_while_the_other_idles_in_step(replica):
    path, group = replica
    tokenizer = Tokenizer.from_pretrained(path)
    prompt = _prompts()[1]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = LLMEngine(load_model(path, progress=False), tokenizer, EngineConfig(**CONFIG)).generate(
        [prompt], greedy)[0].token_ids
    trunks = TrunkGroup([LLMEngine(model, tokenizer, EngineConfig(**CONFIG, micro_batches=2))
                         for model, _ in group.trunks])
    try:
        [out] = trunks.generate([prompt], greedy)
    finally:
        trunks.close()
    assert out.token_ids == expected


def test_settings_that_cannot_step_in_lockstep_are_refused(replica):
    path, group = replica
    tokenizer = Tokenizer.from_pretrained(path)
    (one, _), (two, _) = group.trunks
    with pytest.raises(ValueError, match="lockstep"):
        TrunkGroup([LLMEngine(one, tokenizer, EngineConfig(**CONFIG, static_decode=True)),
                    LLMEngine(two, tokenizer, EngineConfig(**CONFIG))])
    with pytest.raises(ValueError, match="same number of micro-batches"):
        TrunkGroup([LLMEngine(one, tokenizer, EngineConfig(**CONFIG, micro_batches=2)),
                    LLMEngine(two, tokenizer, EngineConfig(**CONFIG))])


def test_an_async_engine_streams_requests_over_both_trunks(replica):
    """The group driven as one engine by AsyncLLMEngine (as a replica drives its engine): concurrent streams get the
    single-process tokens, an aborted stream gives its blocks back, and the stats are both trunks' summed."""
    path, group = replica
    tokenizer = Tokenizer.from_pretrained(path)
    alone = LLMEngine(load_model(path, progress=False), tokenizer, EngineConfig(**CONFIG))
    prompts, params = _prompts(), _params()
    expected = [alone.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    trunks = TrunkGroup([LLMEngine(model, tokenizer, EngineConfig(**CONFIG, micro_batches=2))
                         for model, _ in group.trunks])
    engine = AsyncLLMEngine(trunks)

    async def run(prompt, sp) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompt, sp):
            tokens = out.token_ids
        return tokens

    async def aborted() -> int:
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        async for out in engine.generate(prompts[1], long):
            if len(out.token_ids) >= 3:
                break  # closing the stream aborts the request
        return len(out.token_ids)

    async def main():
        return await asyncio.gather(*(run(p, sp) for p, sp in zip(prompts, params, strict=True)), aborted())

    try:
        *got, stopped_at = asyncio.run(main())
    finally:
        trunks.close()
    assert got == expected
    assert stopped_at >= 3
    stats = trunks.stats()
    assert stats.kv_blocks_held == 0 and stats.running == 0 and stats.waiting == 0
    assert stats.kv_blocks == {g: 2 * n for g, n in trunks.engines[0].stats().kv_blocks.items()}


def test_a_prompt_goes_to_the_trunk_whose_prefix_cache_holds_its_start(replica):
    """A prompt with nothing cached goes to the trunk holding the least KV; a second turn resending the first's
    prompt goes where the first ran (its blocks are cached there) even though that trunk holds more KV."""
    path, group = replica
    tokenizer = Tokenizer.from_pretrained(path)
    trunks = TrunkGroup([LLMEngine(model, tokenizer, EngineConfig(**CONFIG)) for model, _ in group.trunks])
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    try:
        history = _prompts()[1]  # 41 tokens: two full blocks of 16 cached once it has run
        [first] = trunks.generate([history], greedy)
        home = trunks.trunk_of(trunks.add_request(_prompts()[3], long))  # a long request beside its blocks
        assert home == 0, "nothing held anywhere: the first trunk"
        for _ in range(3):
            trunks.step()
        loads = [e.stats().kv_blocks_held for e in trunks.engines]
        assert loads[0] > loads[1] == 0
        fresh = trunks.add_request(_prompts()[0], greedy)
        assert trunks.trunk_of(fresh) == 1, "nothing cached: the trunk holding the least KV"
        resent = trunks.add_request(history + first.token_ids + [7, 8, 9], greedy)
        assert trunks.trunk_of(resent) == 0, "the cached prefix wins over the load"
        while trunks.has_unfinished():
            trunks.step()
        assert trunks.engines[0].stats().prefix_hit_tokens >= 32  # and it was a hit there
    finally:
        trunks.close()


def test_a_dead_shard_fails_both_trunks_requests_at_once_and_frees_their_blocks(tmp_path):
    """With several trunks a shard is not restarted in place: a shard process killed mid-generation fails every
    request on both trunks with UNAVAILABLE (reason experts_lost: the gateway continues them elsewhere) within
    seconds, whichever trunk was idle, and no KV block is left held."""
    path = make_tiny(tmp_path / "scout", preset="scout", seed=9)
    tokenizer = Tokenizer.from_pretrained(path)
    group = MtoN(path, "scout", processes=True, timeout_s=120.0)
    trunks = TrunkGroup([LLMEngine(model, tokenizer, EngineConfig(**CONFIG)) for model, _ in group.trunks])
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    try:
        ids = [trunks.add_request(p, long) for p in _prompts()]
        assert {trunks.trunk_of(rid) for rid in ids} == {0, 1}
        for _ in range(3):
            trunks.step()
        group.procs[0].kill()
        group.procs[0].wait(timeout=30)
        final, started = {}, time.monotonic()
        while trunks.has_unfinished() and time.monotonic() - started < 60:
            final.update((out.request_id, out) for out in trunks.step() if out.finished)
        assert not trunks.has_unfinished(), "every request ended"
        assert time.monotonic() - started < 30
        assert sorted(final) == sorted(ids)
        assert {out.finish_reason for out in final.values()} == {"error"}
        assert {(out.error.code, out.error.reason) for out in final.values()} == {(Code.UNAVAILABLE, EXPERTS_LOST)}
        assert trunks.stats().kv_blocks_held == 0
        assert not any(transport.healthy() for _, transport in group.trunks)
    finally:
        trunks.close()
        for _, transport in group.trunks:
            transport.group.close()
        for proc in group.procs:
            proc.kill()
            proc.wait(timeout=30)
