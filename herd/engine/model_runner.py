"""Runs one scheduled step: a mixed batch of prefill chunks and decodes, over the paged KV cache.

Legend: N tokens in the step, C chunks (one per scheduled sequence), H hidden, V vocab,
Q query heads, K key/value heads, D head dim.

Everything except attention runs on all N tokens at once. Attention runs per chunk: its keys and
values are gathered from its blocks (for chunked layers only from the current chunk's window) and
attended with the same position-based mask the model uses, so a chunk computes exactly what the full
causal forward would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.engine.kv_cache_manager import KVCacheManager
from herd.engine.paged_kv import PagedKVCache
from herd.engine.scheduler import ScheduledChunk
from herd.model.attention import attend
from herd.model.llama4 import Llama4Model
from herd.model.rope import inv_frequencies, rotations


@dataclass
class _ChunkGeometry:
    rows: slice  # this chunk's tokens within the step
    slots: dict[str, torch.Tensor]  # per group: flat cache slot of each new token [n]
    blocks: dict[str, torch.Tensor]  # per group: blocks holding the attended window, in order
    key_positions: dict[str, torch.Tensor]  # per group: positions of the attended keys [S]


class ModelRunner:
    """Owns nothing but the step: the model, the KV tensors and the block tables are given."""

    def __init__(self, model: Llama4Model, kv: KVCacheManager, cache: PagedKVCache) -> None:
        self.model = model
        self.kv = kv
        self.cache = cache
        self.device = model.lm_head.weight.device
        self.inv_freq = inv_frequencies(model.config.rope, model.config.head_dim).to(self.device)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Compute every chunk; return float32 logits [C_sampling, V] for the chunks that sample, in order."""
        ids, positions, geometry = self._prepare(chunks)
        x = self.model.model.embed_tokens(ids)  # [N, H]
        rot = rotations(positions, self.inv_freq)
        for index, layer in enumerate(self.model.model.layers):
            group = self.cache.groups[index]
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), positions, rot)  # [N, Q, D], [N, K, D] x2
            self.cache.write(index, torch.cat([g.slots[group] for g in geometry]), k, v)
            out = torch.empty_like(q)
            for g in geometry:
                keys, values = self.cache.gather(index, g.blocks[group], g.key_positions[group].shape[0])
                out[g.rows] = attend(
                    q[g.rows], keys, values, positions[g.rows], g.key_positions[group], attn.chunk_size
                )
            x = x + attn.o_proj(out.flatten(1))
            x = x + layer.feed_forward(layer.post_attention_layernorm(x))
        last = [g.rows.stop - 1 for g, c in zip(geometry, chunks, strict=True) if c.samples]
        return self.model.lm_head(self.model.model.norm(x[last])).float()

    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, list[_ChunkGeometry]]:
        ids: list[int] = []
        positions: list[int] = []
        geometry = []
        block = self.kv.block_size
        for chunk in chunks:
            first, end = chunk.start, chunk.start + chunk.num_tokens
            rows = slice(len(ids), len(ids) + chunk.num_tokens)
            ids += chunk.seq.token_ids()[first:end]
            positions += range(first, end)
            slots, blocks, key_positions = {}, {}, {}
            for group in self.kv.pools:
                table = self.kv.table(chunk.seq, group)
                window = self.kv.window_start(group, first)
                span = table[window // block : -(-end // block)]
                slots[group] = torch.tensor([table[p // block] * block + p % block for p in range(first, end)])
                blocks[group] = torch.tensor(span)
                key_positions[group] = torch.arange(window, end)
            geometry.append(_ChunkGeometry(rows, slots, blocks, key_positions))
        for g in geometry:
            g.slots = {k: t.to(self.device) for k, t in g.slots.items()}
            g.blocks = {k: t.to(self.device) for k, t in g.blocks.items()}
            g.key_positions = {k: t.to(self.device) for k, t in g.key_positions.items()}
        return torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device), geometry
