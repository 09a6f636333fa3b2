"""Ping-pong micro-batches with the experts on 2 shard processes over the collective group (gloo): the engine's
tokens with steps split in two equal those of whole steps and of the single-process model (issue 28)."""

from __future__ import annotations

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.model import load_model
from herd.model.tiny import make_tiny
from herd.model.tokenizer import Tokenizer
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.placement import place_experts
from tests.integration.workers.shard_processes import CollectiveShards

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
EXPERTS = {"scout": 16, "maverick": 32}


@pytest.mark.parametrize("preset", ["scout", "maverick"])
def test_split_steps_over_shards_give_the_single_process_tokens(tmp_path, preset):
    path = make_tiny(tmp_path / preset, preset=preset, seed=4)
    experts = EXPERTS[preset]
    specs = [f"{owned[0]}:{owned[-1] + 1}" for owned in place_experts(experts, 2).shard_experts]
    prompts = [torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (4, 33, 12, 21, 7)]
    tokenizer = Tokenizer.from_pretrained(path)
    alone = LLMEngine(load_model(path, progress=False), tokenizer, EngineConfig(kv_cache_mb=16)).generate(
        prompts, GREEDY)
    with CollectiveShards(path, specs) as shards:
        trunk = load_model(path, experts=(), progress=False)
        ExpertDispatcher(place_experts(experts, 2), shards.transport).attach(trunk)
        engine = LLMEngine(trunk, tokenizer, EngineConfig(kv_cache_mb=16, micro_batches=2))
        calls = shards.transport.stats.calls
        split = engine.generate(prompts, GREEDY)
        assert shards.transport.stats.calls > calls
    assert [o.token_ids for o in split] == [o.token_ids for o in alone]
