"""Runs one scheduled step: a mixed batch of prefill chunks and decodes, through the model's own forward.

Legend: N tokens in the step, C chunks (one per scheduled sequence), V vocab, M image tokens in the step.

The runner only lays the step out: every chunk's tokens and positions end to end, the rows that take
image features (a chunk boundary may fall inside an image, so features are placed chunk by chunk), the
rows whose logits are sampled, and the step's view of the paged KV cache (herd.engine.paged_attention).
The arithmetic is the model's.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from herd.engine.kv_cache_manager import KVCacheManager
from herd.engine.paged_attention import PagedAttention
from herd.engine.paged_kv import PagedKVCache
from herd.engine.scheduler import ScheduledChunk
from herd.model.llama4 import Llama4Model


class ModelRunner:
    """Owns nothing but the step: the model, the KV tensors and the block tables are given."""

    def __init__(self, model: Llama4Model, kv: KVCacheManager, cache: PagedKVCache) -> None:
        self.model = model
        self.kv = kv
        self.cache = cache
        self.device = model.device

    @torch.inference_mode()
    def run(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Compute every chunk; return float32 logits [C_sampling, V] for the chunks that sample, in order."""
        ids, positions = self._tokens(chunks)  # [N], [N]
        image_rows, image_embeds = self._images(chunks)  # [M], [M, H]
        ends = itertools.accumulate(c.num_tokens for c in chunks)
        sampled = torch.tensor([end - 1 for end, c in zip(ends, chunks, strict=True) if c.samples], dtype=torch.long)
        context = PagedAttention(chunks, self.kv, self.cache, self.device)
        logits: torch.Tensor = self.model(ids, positions.to(self.device), context, image_embeds=image_embeds,
                                          image_rows=image_rows, logit_rows=sampled)  # [C_sampling, V]
        return logits.float()

    @staticmethod
    def _tokens(chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        for chunk in chunks:
            end = chunk.start + chunk.num_tokens
            ids += chunk.seq.token_ids()[chunk.start : end]
            positions += range(chunk.start, end)
        return torch.tensor(ids), torch.tensor(positions)

    @staticmethod
    def _images(chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Early fusion: the step's rows that are image placeholders of a prompt chunk, and their features."""
        rows: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        row = 0
        for chunk in chunks:
            images = chunk.seq.images
            if images is not None and chunk.start < len(chunk.seq.prompt_ids):
                offsets, found = images.within(chunk.start, chunk.start + chunk.num_tokens)  # [k], [k, H]
                if offsets.numel():
                    rows.append(offsets + row)
                    features.append(found)
            row += chunk.num_tokens
        if not rows:
            return None, None
        return torch.cat(rows), torch.cat(features)
