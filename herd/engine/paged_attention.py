"""One step's view of the paged KV cache: the KV context the model's attention runs on inside the engine.

Legend: N tokens in the step, Q query heads, K key/value heads, D head dim, S attended keys, G decoding
sequences, T tokens of one prefill chunk.

Built once per step from the scheduled chunks (the way nano-vllm sets a per-step context): for each layer
group (chunked local attention, full attention) where every new token is written (slot mapping), and what
each token reads (block tables cut to the chunk's window) with the same position-based mask the model
uses, so a chunk computes exactly what the full causal forward would:
- every decode (one new token) of the step attends in one padded, batched call per layer;
- each prefill chunk attends on its own.
Where to read and what to mask depends only on the step and the layer's group, so it is worked out once
per step and group, not per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from herd.engine.kv_cache_manager import FULL, KVCacheManager
from herd.engine.paged_kv import PagedKVCache
from herd.engine.scheduler import ScheduledChunk
from herd.model.causal_attention import attention_mask


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


class PagedAttention:
    """A KVContext (herd.model.kv_cache) over the engine's paged cache for one step's chunks."""

    def __init__(self, chunks: Sequence[ScheduledChunk], kv: KVCacheManager, cache: PagedKVCache,
                 device: torch.device) -> None:
        self.cache = cache
        self.device = device
        self.plans = {group: self._plan(chunks, kv, group) for group in kv.pools}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               chunk_size: int | None) -> torch.Tensor:
        """Write the step's k, v [N, K, D] to their slots, then [N, Q, D] queries -> [N, Q, D] outputs over the
        layer's paged keys (the chunk windows are in the step's plan, so chunk_size is not needed here)."""
        plan = self.plans[self.cache.groups[layer]]
        self.cache.write(layer, plan.write_slots, k, v)
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

    def _plan(self, chunks: Sequence[ScheduledChunk], kv: KVCacheManager, group: str) -> _GroupPlan:
        block = kv.block_size
        chunk_size = kv.layout.chunk_size if group != FULL else None
        write: list[int] = []
        decode_rows: list[int] = []
        decode_blocks: list[list[int]] = []  # each decode's window, as blocks
        decode_lengths: list[int] = []
        prefills: list[_Prefill] = []
        row = 0
        for chunk in chunks:
            # Every position from the window on holds a block (only blocks before the window are freed).
            table = cast("list[int]", kv.table(chunk.seq, group))
            first, end = chunk.start, chunk.start + chunk.num_tokens
            write += [table[p // block] * block + p % block for p in range(first, end)]
            window = kv.window_start(group, first)  # a multiple of the block size
            blocks = list(table[window // block : -(-end // block)])
            if chunk.num_tokens == 1:
                decode_rows.append(row)
                decode_blocks.append(blocks)
                decode_lengths.append(end - window)
            else:
                slots = self._slots(self._tensor([blocks]), block)[0, : end - window]
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
            decode_slots=self._slots(blocks_tensor, block),
            decode_mask=mask[:, None, None, :].to(self.device),
            prefills=prefills,
        )

    @staticmethod
    def _slots(blocks: torch.Tensor, block: int) -> torch.Tensor:
        """[G, n] block ids -> [G, n*B] the flat cache slot of every token they hold, in order."""
        offsets = torch.arange(block, device=blocks.device)
        return (blocks[:, :, None] * block + offsets).flatten(1)

    def _tensor(self, values: Sequence[object]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
