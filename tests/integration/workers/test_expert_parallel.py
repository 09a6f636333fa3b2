"""Tiny Scout and Maverick served by 1, 2 and 4 expert-shard processes over gRPC: exact, lean, and
failing cleanly when a shard dies."""

from __future__ import annotations

import time

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.model import load_model
from herd.model.tiny import make_tiny
from herd.model.tokenizer import Tokenizer
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.grpc_transport import GrpcTransport
from herd.workers.placement import place_experts
from tests.integration.workers.shard_processes import ShardProcesses

SHARD_COUNTS = (1, 2, 4)
ENGINE = EngineConfig(kv_cache_mb=16, max_num_seqs=16)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _specs(num_experts, shards):
    return [f"{owned[0]}:{owned[-1] + 1}" for owned in place_experts(num_experts, shards).shard_experts]


@pytest.fixture(scope="module", params=["scout", "maverick"])
def served(request, tmp_path_factory):
    """The checkpoint and, for each shard count, running shard processes (all started at once)."""
    path = make_tiny(tmp_path_factory.mktemp(request.param), preset=request.param, seed=6)
    experts = 16 if request.param == "scout" else 32
    groups = {n: ShardProcesses(path, _specs(experts, n)) for n in SHARD_COUNTS}
    yield path, experts, groups
    for group in groups.values():
        group.stop()


def _trunk(path, experts, addresses, **transport):
    trunk = load_model(path, experts=(), progress=False)
    dispatcher = ExpertDispatcher(place_experts(experts, len(addresses)), GrpcTransport(addresses, **transport))
    dispatcher.attach(trunk)
    return trunk, dispatcher


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_logits_and_greedy_tokens_equal_the_single_process_model(served, shards):
    path, experts, groups = served
    full = load_model(path, progress=False)
    trunk, dispatcher = _trunk(path, experts, groups[shards].addresses)
    for seed in range(2):
        ids = torch.randint(0, full.config.vocab_size, (45,), generator=torch.Generator().manual_seed(seed))
        expected = full.logits(ids)
        assert float((trunk.logits(ids) - expected).norm() / expected.norm()) < 1e-5
    prompts = [list(range(3, 3 + n)) for n in (5, 20, 37)]
    tokenizer = Tokenizer.from_pretrained(path)
    alone = LLMEngine(full, tokenizer, ENGINE).generate(prompts, GREEDY)
    sharded = LLMEngine(trunk, tokenizer, ENGINE).generate(prompts, GREEDY)
    assert [o.token_ids for o in sharded] == [o.token_ids for o in alone]
    dispatcher.transport.close()


def test_each_shard_holds_its_share_of_the_expert_bytes(served):
    _path, experts, groups = served
    full = GrpcTransport(groups[1].addresses).infos[0].resident_expert_bytes
    per_expert = full / experts
    for shards in SHARD_COUNTS[1:]:
        transport = GrpcTransport(groups[shards].addresses)
        for info in transport.infos:
            assert abs(info.resident_expert_bytes - full / shards) <= per_expert, (shards, info.experts)
            assert info.resident_expert_bytes == len(info.experts) * per_expert
        transport.close()


def test_a_killed_shard_fails_its_requests_in_time_and_serving_resumes_after_restart(tmp_path):
    path = make_tiny(tmp_path / "scout", preset="scout", seed=7)
    with ShardProcesses(path, _specs(16, 2)) as shards:
        trunk, dispatcher = _trunk(path, 16, shards.addresses, timeout_s=10.0)
        engine = LLMEngine(trunk, Tokenizer.from_pretrained(path), ENGINE)
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        ids = [engine.add_request(list(range(5, 5 + n)), long) for n in (4, 9, 30)]
        for _ in range(3):
            engine.step()
        assert dispatcher.healthy()
        shards.kill(1)
        started = time.monotonic()
        finished = {}
        while engine.has_unfinished():
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        assert time.monotonic() - started < 10.0, "within the dispatch deadline, never a hang"
        assert sorted(finished) == sorted(ids)
        for out in finished.values():
            assert out.finish_reason == "error" and out.error is not None and out.error.code == "UNAVAILABLE", out.error
        assert all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())
        assert not dispatcher.healthy()
        shards.restart(1)
        assert dispatcher.healthy()
        out = engine.generate([list(range(5, 20))], GREEDY)[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 16
        dispatcher.transport.close()


@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_quantised_experts_served_by_shard_processes_equal_the_single_process_model(tmp_path, scheme):
    from herd.model.quant.convert import quantize_checkpoint

    source = make_tiny(tmp_path / "float", preset="maverick", seed=7)
    path = quantize_checkpoint(source, tmp_path / scheme, scheme, progress=False)
    group = ShardProcesses(path, _specs(32, 2))
    try:
        full = load_model(path, progress=False)
        trunk, dispatcher = _trunk(path, 32, group.addresses)
        ids = torch.randint(0, full.config.vocab_size, (45,), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(trunk.logits(ids), full.logits(ids), rtol=0, atol=0)
        prompts = [list(range(3, 3 + n)) for n in (5, 20)]
        tokenizer = Tokenizer.from_pretrained(path)
        alone = LLMEngine(full, tokenizer, ENGINE).generate(prompts, GREEDY)
        sharded = LLMEngine(trunk, tokenizer, ENGINE).generate(prompts, GREEDY)
        assert [o.token_ids for o in sharded] == [o.token_ids for o in alone]
        quantised = sum(info.resident_expert_bytes for info in dispatcher.transport.infos)
        dispatcher.transport.close()
        config = full.config
        float_bytes = 4 * 3 * config.hidden_size * config.intermediate_size * 32 * len(config.moe_layers)
        assert quantised < float_bytes / (6 if scheme == "int4" else 3), (quantised, float_bytes)
    finally:
        group.stop()
