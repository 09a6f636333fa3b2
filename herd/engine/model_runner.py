"""Runs one scheduled step: a mixed batch of prefill chunks and decodes, over the paged KV cache.

Legend: N tokens in the step, C chunks (one per scheduled sequence), H hidden, V vocab,
Q query heads, K key/value heads, D head dim, S attended keys, G decoding sequences.

Everything except attention runs on all N tokens at once. Attention reads keys and values from the
sequences' blocks (for chunked layers only the current chunk's window) with the same position-based
mask the model uses, so a chunk computes exactly what the full causal forward would:
- every decode (one new token) of the step attends in one padded, batched call per layer;
- each prefill chunk attends on its own.
Image features replace their placeholders' embeddings chunk by chunk, so a chunk boundary may fall
inside an image. Where to read and what to mask depends only on the step and the layer's group, so it
is worked out once per step and group, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from herd.engine.kv_cache_manager import KVCacheManager
from herd.engine.paged_kv import PagedKVCache
from herd.engine.scheduler import ScheduledChunk
from herd.model.attention import attention_mask
from herd.model.llama4 import Llama4Model
from herd.model.rope import inv_frequencies, rotations


@dataclass
class _Prefill:
    rows: slice  # the chunk's tokens within the step
    slots: torch.Tensor  # [S] cache slots of the attended keys, in position order
    mask: torch.Tensor  # [T, S] bool


@dataclass
class _GroupPlan:
    """Where one layer group's attention reads, for the whole step."""

    write_slots: torch.Tensor  # [N] cache slot of every new token
    decode_rows: torch.Tensor  # [G] rows of the step that are decodes
    decode_slots: torch.Tensor  # [G, S_max] slots of each decode's keys (padding points anywhere)
    decode_mask: torch.Tensor  # [G, 1, 1, S_max] bool: real keys
    prefills: list[_Prefill]


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
        ids, positions = self._tokens(chunks)
        plans = {group: self._plan(chunks, group) for group in self.kv.pools}
        x = self.model.model.embed_tokens(ids)  # [N, H]
        self._place_images(x, chunks)
        rot = rotations(positions, self.inv_freq)
        for index, layer in enumerate(self.model.model.layers):
            plan = plans[self.cache.groups[index]]
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), positions, rot)  # [N, Q, D], [N, K, D] x2
            self.cache.write(index, plan.write_slots, k, v)
            x = x + attn.o_proj(self._attend(index, q, plan).flatten(1))
            x = x + layer.feed_forward(layer.post_attention_layernorm(x))
        ends = torch.tensor([0, *[c.num_tokens for c in chunks]]).cumsum(0)
        last = [int(ends[i + 1]) - 1 for i, c in enumerate(chunks) if c.samples]
        return self.model.lm_head(self.model.model.norm(x[last])).float()

    def _place_images(self, x: torch.Tensor, chunks: list[ScheduledChunk]) -> None:
        """Early fusion: each chunk's image placeholders take their image features, in place of [N, H] x."""
        row = 0
        for chunk in chunks:
            images = chunk.seq.images
            if images is not None and chunk.start < len(chunk.seq.prompt_ids):
                offsets, features = images.within(chunk.start, chunk.start + chunk.num_tokens)  # [k], [k, H]
                if offsets.numel():
                    x[(offsets + row).to(x.device)] = features.to(device=x.device, dtype=x.dtype)
            row += chunk.num_tokens

    def _attend(self, layer: int, q: torch.Tensor, plan: _GroupPlan) -> torch.Tensor:
        """[N, Q, D] queries -> [N, Q, D] attention outputs, reading the layer's paged keys."""
        out = torch.empty_like(q)
        scale = q.shape[-1] ** -0.5
        if plan.decode_rows.numel():
            g, s_max = plan.decode_slots.shape
            keys, values = self.cache.read(layer, plan.decode_slots.flatten())  # [G*S, K, D]
            keys = keys.view(g, s_max, *keys.shape[1:]).transpose(1, 2)  # [G, K, S, D]
            values = values.view(g, s_max, *values.shape[1:]).transpose(1, 2)
            queries = q.index_select(0, plan.decode_rows).unsqueeze(2)  # [G, Q, 1, D]
            attended = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=plan.decode_mask, scale=scale, enable_gqa=True
            )  # [G, Q, 1, D]
            out.index_copy_(0, plan.decode_rows, attended.squeeze(2))
        for prefill in plan.prefills:
            keys, values = self.cache.read(layer, prefill.slots)  # [S, K, D]
            out[prefill.rows] = F.scaled_dot_product_attention(
                q[prefill.rows].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=prefill.mask, scale=scale, enable_gqa=True,
            ).transpose(0, 1)
        return out

    def _tokens(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        for chunk in chunks:
            end = chunk.start + chunk.num_tokens
            ids += chunk.seq.token_ids()[chunk.start : end]
            positions += range(chunk.start, end)
        return torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device)

    def _plan(self, chunks: list[ScheduledChunk], group: str) -> _GroupPlan:
        block = self.kv.block_size
        chunk_size = self.kv.layout.chunk_size if group != "full" else None
        write: list[int] = []
        decode_rows: list[int] = []
        decode_blocks: list[list[int]] = []  # each decode's window, as blocks
        decode_lengths: list[int] = []
        prefills: list[_Prefill] = []
        row = 0
        for chunk in chunks:
            table = self.kv.table(chunk.seq, group)
            first, end = chunk.start, chunk.start + chunk.num_tokens
            write += [table[p // block] * block + p % block for p in range(first, end)]  # type: ignore[operator]
            window = self.kv.window_start(group, first)  # a multiple of the block size
            blocks = table[window // block : -(-end // block)]
            if chunk.num_tokens == 1:
                decode_rows.append(row)
                decode_blocks.append(blocks)  # type: ignore[arg-type]
                decode_lengths.append(end - window)
            else:
                slots = self._slots(self._tensor([blocks]))[0, : end - window]
                mask = attention_mask(torch.arange(first, end), torch.arange(window, end), chunk_size)
                prefills.append(_Prefill(slice(row, row + chunk.num_tokens), slots, mask.to(self.device)))
            row += chunk.num_tokens
        width = max((len(b) for b in decode_blocks), default=0)
        padded = [b + [0] * (width - len(b)) for b in decode_blocks]
        blocks_tensor = self._tensor(padded).view(len(decode_blocks), width)
        lengths = torch.tensor(decode_lengths, dtype=torch.long)
        mask = torch.arange(width * block)[None, :] < lengths[:, None]  # [G, S_max]
        return _GroupPlan(
            write_slots=self._tensor(write),
            decode_rows=self._tensor(decode_rows),
            decode_slots=self._slots(blocks_tensor),
            decode_mask=mask[:, None, None, :].to(self.device),
            prefills=prefills,
        )

    def _slots(self, blocks: torch.Tensor) -> torch.Tensor:
        """[G, n] block ids -> [G, n*B] the flat cache slot of every token they hold, in order."""
        block = self.kv.block_size
        offsets = torch.arange(block, device=blocks.device)
        return (blocks[:, :, None] * block + offsets).flatten(1)

    def _tensor(self, values: list) -> torch.Tensor:  # type: ignore[type-arg]
        return torch.tensor(values, dtype=torch.long, device=self.device)
