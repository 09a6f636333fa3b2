"""Async scheduling counts a step done (and caches the blocks it filled) before its forward ends: when that forward
fails, those blocks leave the prefix cache, so no later request takes a hit on KV that was never written."""

from __future__ import annotations

import pytest
import torch

from herd.engine import EngineConfig, HerdError, LLMEngine, SamplingParams
from herd.engine.errors import Code
from herd.model.moe import MoE
from herd.model.tiny import make_tiny

SMALL = dict(kv_cache_mb=16, max_num_seqs=16, max_num_batched_tokens=48, enable_prefix_caching=True,
             fault_hold_s=0)  # a failed step fails its requests (not held: tests/unit/engine/test_fault_hold.py)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=9)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(4)
    first = torch.randint(3, 400, (48,), generator=g).tolist()  # three full blocks, the whole step budget
    return first, [*first[:40], *torch.randint(3, 400, (10,), generator=g).tolist()]  # shares two blocks


def _down_on_first_forward(engine: LLMEngine) -> None:
    """The experts' shard is gone for the engine's first forward: its last MoE layer raises after the earlier
    layers wrote their KV."""
    layers = {m.layer: m.experts for m in engine.model.modules() if isinstance(m, MoE)}
    first, last = min(layers), max(layers)
    forwards = [0]

    def experts(layer, rows, expert_offsets):
        forwards[0] += layer == first
        if layer == last and forwards[0] == 1:
            raise HerdError(Code.UNAVAILABLE, "expert shard gone")
        return layers[layer](rows, expert_offsets)

    engine.model.set_experts_executor(experts)


def _run(engine: LLMEngine, requests) -> dict:
    for rid, prompt in requests:
        engine.add_request(prompt, GREEDY, request_id=rid)
    final = {}
    while engine.has_unfinished():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    return final


@pytest.fixture(scope="module")
def fresh(scout, prompts):
    """Each prompt's tokens from an engine that never failed (and never hit the cache)."""
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**{**SMALL, "enable_prefix_caching": False}))
    return [engine.generate([prompt], GREEDY)[0].token_ids for prompt in prompts]


def _failed_engine(scout, prompt, undo=True):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, async_scheduling=True))
    if not undo:  # the bug: the failed step's blocks stay cached
        engine.kv.uncache = lambda registered: set()
    _down_on_first_forward(engine)
    failed = _run(engine, [("a", prompt)])["a"]
    assert failed.finish_reason == "error" and failed.error.code is Code.UNAVAILABLE
    assert all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())
    return engine


def test_a_failed_prefill_leaves_nothing_cached(scout, prompts, fresh):
    engine = _failed_engine(scout, prompts[0])
    assert all(not pool.cached_hashes() for pool in engine.kv.pools.values())
    again = _run(engine, [("again", prompts[0])])["again"]
    assert again.num_cached_tokens == 0 and engine.kv.prefix_hit_tokens == 0
    assert again.token_ids == fresh[0]


def test_control_without_the_undo_the_failed_blocks_are_hit(scout, prompts):
    engine = _failed_engine(scout, prompts[0], undo=False)
    again = _run(engine, [("again", prompts[0])])["again"]
    assert again.num_cached_tokens == 32 and engine.kv.prefix_hit_tokens == 32  # blocks 0 and 1: garbage


@pytest.mark.parametrize("undo", [True, False])
def test_a_request_that_hit_the_failed_blocks_meanwhile_is_computed_again(scout, prompts, fresh, undo):
    """b waits while a's prefill takes the whole budget; the next step, scheduled during a's forward, admits b with a
    hit on a's first two blocks. a's forward fails: b starts again from no cached prefix and gives the fresh
    tokens (the control, recompute off, keeps b's hit on garbage)."""
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, async_scheduling=True))
    if not undo:
        engine.scheduler.recompute = lambda seq, out: None
    _down_on_first_forward(engine)
    final = _run(engine, [("a", prompts[0]), ("b", prompts[1])])
    assert final["a"].finish_reason == "error"
    assert final["b"].finish_reason == "length"
    if undo:
        assert final["b"].num_cached_tokens == 0
        assert final["b"].token_ids == fresh[1]
    else:
        assert final["b"].num_cached_tokens == 32
    assert all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())
