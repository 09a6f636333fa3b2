"""KV cache, activation and runtime bytes of a replica, as Herd's engine allocates and uses them.

Legend: S concurrent sequences, X context tokens per sequence, T tokens per engine step
(max_num_batched_tokens), B tokens per KV block, C attention chunk, L layers (L_full global, L_chunk
chunked), K key/value heads, D head dim, H hidden, I expert width, k experts per token, V vocabulary.

KV, chunk-aware (as herd.engine.config.EngineConfig.kv_layout splits kv_cache_bytes): the global layers
need S x ceil(X/B) blocks; the chunked layers S x min(C/B + 1, ceil(X/B)) + ceil(T/B) (each sequence's
widest window, plus one step's new blocks), and the engine gives them as many blocks as the global pool
up to that. Without the chunk saving (every layer keeping the whole context, as an engine without a
hybrid KV cache does): S x ceil(X/B) blocks of all L layers.

Context parallelism over P trunks (issue 28; the runtime does not serve it yet): each sequence's
global-layer KV is split evenly, ceil(X/P) tokens on each trunk, and each trunk gathers only its share
for its partial attention (the partials combined by their log-sum-exp, as ring attention does). The
chunked layers' windows are counted on every trunk for every sequence: conservative, as a sequence's
window lives on its home trunk only.

Activations (an estimate, not a measurement; no GPU has run Herd yet): the step's hidden states,
projections and MoE buffers, T x (4H + (Q + 2K)D + 2kH + 3kI + 3I) values; the attended keys and values
Herd's model runner gathers for one global layer at a time (2 x S x X x K x D values: decodes are padded
to the longest); logits for S rows in bfloat16 and float32. Runtime: CUDA context, cuBLAS and NCCL
workspaces and allocator slack, a fixed reserve per GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.engine import fp8_kv
from herd.engine.config import EngineConfig
from herd.engine.kv_cache_manager import CHUNKED, FULL
from herd.engine.paged_kv import bytes_per_block
from herd.model.config import TextConfig

KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": fp8_kv.FP8, "fp32": torch.float32}
"""`--kv-dtype`: what the KV cache stores; fp8 is EngineConfig.kv_cache_dtype "fp8" (e4m3 with a float32 scale per
token and kv head, which bytes_per_block counts)."""
ACTIVATION_BYTES = 2
"""bfloat16 activations."""
TRUNK_RESERVE_BYTES = 3 * 2**29  # 1.5 GiB
SHARD_RESERVE_BYTES = 2**30


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What one replica must hold at once."""

    sequences: int
    """S: sequences with KV at once."""
    context_tokens: int
    """X: prompt + output tokens of each."""
    step_tokens: int = 8192
    """T: tokens one engine step computes (max_num_batched_tokens)."""
    block_size: int = 16
    kv_dtype: str = "bf16"

    def __post_init__(self) -> None:
        for name in ("sequences", "context_tokens", "step_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"KV dtype must be one of {sorted(KV_DTYPES)}, got {self.kv_dtype!r}")

    @property
    def kv_value_bytes(self) -> int:
        return torch.finfo(KV_DTYPES[self.kv_dtype]).bits // 8

    @property
    def gathered_value_bytes(self) -> int:
        """Bytes per attended key or value element of the per-layer gather: the cache's dtype, and from an FP8 cache
        the e4m3 bytes selected plus their dequantised copy in the activations' dtype (herd.engine.paged_kv.read)."""
        if KV_DTYPES[self.kv_dtype] == fp8_kv.FP8:
            return self.kv_value_bytes + ACTIVATION_BYTES
        return self.kv_value_bytes


def kv_bytes(text: TextConfig, load: Workload, *, chunk_aware: bool = True, context_parallel: int = 1) -> int:
    """The least kv_cache_bytes with which the engine holds the workload: Herd's chunk-aware pools, split
    as EngineConfig.kv_layout splits them, or every layer keeping the whole context. With
    `context_parallel` P > 1: one trunk's share, each sequence's global context split over P trunks and
    every sequence's chunked window kept whole (see the module docstring)."""
    sizes = bytes_per_block(text, load.block_size, KV_DTYPES[load.kv_dtype])  # group -> one block, its layers
    context_blocks = load.sequences * -(-_share(load.context_tokens, context_parallel) // load.block_size)
    if not chunk_aware or CHUNKED not in sizes:
        return context_blocks * sum(sizes.values())
    engine = EngineConfig(block_size=load.block_size, max_num_seqs=load.sequences,
                          max_num_batched_tokens=load.step_tokens, max_model_len=max(2, load.context_tokens))
    windows = engine.chunked_blocks_needed(text, sequences=load.sequences)
    full = sizes.get(FULL, 0)
    if context_blocks >= windows:  # the chunked pool is capped at the windows, the rest is global
        return windows * sizes[CHUNKED] + context_blocks * full
    return windows * (sizes[CHUNKED] + full)  # the pools split evenly: the chunked one binds


def _share(context_tokens: int, context_parallel: int) -> int:
    """Tokens of one sequence's global context on one of `context_parallel` trunks (the largest share)."""
    if context_parallel < 1:
        raise ValueError(f"context_parallel must be at least 1, got {context_parallel}")
    return -(-context_tokens // context_parallel)


def trunk_activation_bytes(text: TextConfig, load: Workload, *, context_parallel: int = 1) -> int:
    """Peak transient memory of one engine step on a trunk's GPU (see the module docstring); with context
    parallelism the gather holds the trunk's share of each sequence's global context."""
    h, i, k = text.hidden_size, text.intermediate_size, text.num_experts_per_tok
    heads = (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim
    step = load.step_tokens * (4 * h + heads + 2 * k * h + 3 * k * i + 3 * i) * ACTIVATION_BYTES
    gathered = 2 * load.sequences * _share(load.context_tokens, context_parallel) * text.num_key_value_heads
    gathered *= text.head_dim
    gathered *= load.gathered_value_bytes
    logits = load.sequences * text.vocab_size * (ACTIVATION_BYTES + 4)
    return step + gathered + logits


def shard_activation_bytes(text: TextConfig, load: Workload, *, trunks: int = 1) -> int:
    """An expert shard's step: every routed row of every trunk's step could come to it (rows in and out,
    gate/up and act)."""
    h, i, k = text.hidden_size, text.intermediate_size, text.num_experts_per_tok
    return trunks * load.step_tokens * k * (2 * h + 3 * i) * ACTIVATION_BYTES
