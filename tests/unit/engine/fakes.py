"""Sequences and a KV manager for scheduler tests that need no model: steps are simulated."""

from __future__ import annotations

from herd.engine.kv_cache_manager import CHUNKED, FULL, KVCacheManager, KVLayout
from herd.engine.sampling_params import SamplingParams
from herd.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from herd.engine.sequence import Sequence, Status

BLOCK = 4
CHUNK = 8


def kv_manager(*, full: int = 256, chunked: int = 256, prefix_caching: bool = True) -> KVCacheManager:
    layout = KVLayout(block_size=BLOCK, chunk_size=CHUNK, num_blocks={FULL: full, CHUNKED: chunked},
                      bytes_per_block={FULL: 100, CHUNKED: 300})
    return KVCacheManager(layout, enable_prefix_caching=prefix_caching)


def seq(rid: str, prompt_len: int, *, max_tokens: int = 4, tenant: str = "a", weight: float = 1.0,
        first_token: int = 1, salt: str | None = None) -> Sequence:
    return Sequence(
        request_id=rid, prompt_ids=list(range(first_token, first_token + prompt_len)),
        params=SamplingParams(max_tokens=max_tokens, temperature=0), tenant_id=tenant, tenant_weight=weight,
        cache_salt=salt if salt is not None else f"tenant:{tenant}",
    )


def simulate_step(scheduler: Scheduler) -> SchedulerOutput:
    """Schedule, pretend the model ran, append token 7 to sampling sequences, finish at max_tokens."""
    out = scheduler.schedule()
    scheduler.on_step_done(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.seq.output_ids.append(7)
            if len(chunk.seq.output_ids) >= chunk.seq.params.max_tokens:
                scheduler.finish(chunk.seq, "length")
    return out


def scheduler(*, max_num_seqs: int = 8, budget: int = 32, **kv_kwargs: int) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget), kv_manager(**kv_kwargs))


def all_blocks_free(s: Scheduler) -> bool:
    return all(pool.num_free == pool.num_blocks for pool in s.kv.pools.values())


__all__ = ["BLOCK", "CHUNK", "Status", "all_blocks_free", "kv_manager", "scheduler", "seq", "simulate_step"]
