"""Engine settings: one typed object, units in the names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.engine.kv_cache_manager import CHUNKED, FULL, KVLayout
from herd.engine.paged_kv import bytes_per_block
from herd.engine.scheduler import SchedulerConfig
from herd.model.config import TextConfig

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How big the engine's batches and KV cache are, and where it computes."""

    block_size: int = 16
    """Tokens per KV block; must divide the model's attention_chunk_size."""
    max_num_seqs: int = 64
    """Sequences holding KV blocks at once."""
    max_num_batched_tokens: int = 512
    """Tokens computed per step (prefill chunks and decodes together)."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; default min(max_position_embeddings, 8192)."""
    kv_cache_bytes: int = 256 * 2**20
    """Memory for KV blocks, both groups together."""
    enable_prefix_caching: bool = True
    """Reuse cached KV blocks of identical prefixes (per tenant unless a sharing group is set)."""
    dtype: torch.dtype = torch.float32
    """Weights, activations and KV cache."""
    device: str = "cpu"
    """torch device of the model and the cache."""

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype}")

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens)

    def context_limit(self, model: TextConfig) -> int:
        return self.max_model_len or min(model.max_position_embeddings, 8192)

    def kv_layout(self, model: TextConfig) -> KVLayout:
        """Split kv_cache_bytes between the groups: the chunked pool gets what its windows can ever
        need (twice, so passed chunks stay cached a while), the global pool the rest."""
        sizes = bytes_per_block(model, self.block_size, self.dtype)
        chunk = model.attention_chunk_size if CHUNKED in sizes else None
        blocks: dict[str, int] = {}
        if chunk is not None:
            if chunk % self.block_size:
                raise ValueError(f"block_size {self.block_size} does not divide attention_chunk_size {chunk}")
            window = chunk // self.block_size + 1
            blocks[CHUNKED] = 2 * (self.max_num_seqs * window + -(-self.max_num_batched_tokens // self.block_size))
        left = self.kv_cache_bytes - blocks.get(CHUNKED, 0) * sizes.get(CHUNKED, 0)
        if FULL in sizes:
            blocks[FULL] = max(0, left // sizes[FULL])
            needed = -(-self.context_limit(model) // self.block_size)
            if blocks[FULL] < needed:
                raise ValueError(
                    f"kv_cache_bytes {self.kv_cache_bytes} holds {blocks[FULL]} global blocks; one sequence of "
                    f"max_model_len {self.context_limit(model)} needs {needed}"
                )
        elif left < 0:
            raise ValueError(f"kv_cache_bytes {self.kv_cache_bytes} is too small for the chunked layers' windows")
        return KVLayout(block_size=self.block_size, chunk_size=chunk, num_blocks=blocks, bytes_per_block=sizes)
