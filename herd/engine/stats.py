"""What an engine holds right now, for whoever reports on it (a replica's stats and Prometheus metrics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    running: int
    """Requests holding KV blocks."""
    waiting: int
    """Requests queued for their first (or, after preemption, next) blocks."""
    kv_blocks: dict[str, int]
    """Blocks of each layer group's pool (chunked, full)."""
    kv_blocks_used: dict[str, int]
    """Blocks in use in each group's pool."""
    prefix_queried_tokens: int
    """Prompt tokens looked up in the prefix cache, since the engine started."""
    prefix_hit_tokens: int
    """Prompt tokens found there."""
    preemptions: int
    """Requests preempted for KV blocks, since the engine started."""
    draft_tokens: int = 0
    """Speculative decoding since the engine started: draft tokens verified, and those the model agreed with."""
    accepted_tokens: int = 0

    @property
    def kv_blocks_held(self) -> int:
        return sum(self.kv_blocks_used.values())
