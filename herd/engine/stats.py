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
    host_kv_blocks: int = 0
    """Host KV tier: slots of both groups (0: no tier), and those holding a block now."""
    host_kv_blocks_held: int = 0
    host_kv_hit_blocks: int = 0
    """Since the engine started: blocks restored from the host tier at admission, and the prompt tokens whose
    blocks came (in part) from it."""
    host_kv_hit_tokens: int = 0
    host_kv_saved_bytes: int = 0
    """Since the engine started: bytes copied device to host (evicted blocks saved), and host to device."""
    host_kv_restored_bytes: int = 0
    kv_exported_blocks: int = 0
    """Since the engine started: prefix blocks (both groups) exported to other engines, and imported from them
    (herd.engine.kv_export; prefill/decode disaggregation)."""
    kv_imported_blocks: int = 0
    lora_adapters_registered: int = 0
    """LoRA adapters registered now (on the host), those in the bank now (at most max_loras), and since the engine
    started: adapters loaded into the bank and adapters evicted from it to make room."""
    lora_adapters_resident: int = 0
    lora_adapter_loads: int = 0
    lora_adapter_evictions: int = 0
    fault_failed_steps: int = 0
    """Since the engine started: steps whose forward failed (an expert shard unreachable or late), holds begun on
    such failures (the step's requests kept and retried, EngineConfig.fault_hold_s), holds that ended with a
    successful step, and how long the last of those lasted (s)."""
    fault_holds: int = 0
    fault_recoveries: int = 0
    fault_last_recovery_s: float = 0.0
    fault_held: bool = False
    """Whether the engine is holding failed steps' requests now (no step has succeeded since a failure)."""

    @property
    def kv_blocks_held(self) -> int:
        return sum(self.kv_blocks_used.values())
