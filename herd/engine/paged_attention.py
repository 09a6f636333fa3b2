"""One step's view of the paged KV cache: the KV context the model's attention runs on inside the engine.

Legend: N tokens in the step, Q query heads, K key/value heads, D head dim, S attended keys, G decoding
sequences, T tokens of one prefill chunk, E chunks verifying drafts, U the most tokens one of them has.

Built once per step from the scheduled chunks (the way nano-vllm sets a per-step context): for each layer
group (chunked local attention, full attention) where every new token is written (slot mapping), and what
each token reads (block tables cut to the chunk's window) with the same position-based mask the model
uses, so a chunk computes exactly what the full causal forward would:
- every decode (one new token) of the step attends in one padded, batched call per layer;
- so do the chunks verifying draft tokens (speculative decoding: a few tokens each), in one more call, their
  queries padded to the longest and masked causally;
- each prefill chunk attends on its own.
Where to read and what to mask depends only on the step and the layer's group, so it is worked out once
per step and group, not per layer. A padded pure-decode step (herd.engine.decode_graphs) builds its plans on
the device from persistent buffers instead, with decode_slots below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from herd.engine.context_parallel import ContextParallel, SpreadAttention
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
class GroupPlan:
    """Where one layer group's attention reads, for the whole step."""

    write_slots: torch.Tensor  # [N] cache slot of every new token
    decode_rows: torch.Tensor  # [G] rows of the step that are decodes
    decode_slots: torch.Tensor  # [G, S_max] slots of each decode's keys (padding points anywhere)
    decode_mask: torch.Tensor  # [G, 1, 1, S_max] bool: real keys
    prefills: list[_Prefill]
    verify: _Verify | None = None  # the chunks verifying drafts, batched


@dataclass
class _Verify:
    rows: torch.Tensor  # [E, U] rows of the step (a chunk's padding repeats its last row; its output is dropped)
    real: torch.Tensor  # [E*U] bool: the rows that are not padding
    slots: torch.Tensor  # [E, S_max] slots of each chunk's window of keys (padding points at slot 0, masked)
    mask: torch.Tensor  # [E, 1, U, S_max] bool: causal within each chunk's window


class PagedAttention:
    """A KVContext (herd.model.kv_cache) over the engine's paged cache for one step's chunks."""

    def __init__(self, cache: PagedKVCache, plans: dict[str, GroupPlan], spread: SpreadAttention | None = None) -> None:
        self.cache = cache
        self.plans = plans
        self.spread = spread
        """The global layers' exchange with the other trunks (context parallelism; None: off)."""

    @classmethod
    def for_step(cls, chunks: Sequence[ScheduledChunk], kv: KVCacheManager, cache: PagedKVCache,
                 device: torch.device, cp: ContextParallel | None = None) -> PagedAttention:
        """The plans of a step of any shape, worked out on the host and copied to `device`; with context parallelism
        the chunks whose global blocks are spread over trunks attend through the exchange instead."""
        if cp is None:
            return cls(cache, {group: _plan(chunks, kv, group, device) for group in kv.pools})
        spread = cp.spread(chunks, kv)
        plans = {group: _plan(chunks, kv, group, device, skip=spread if group == FULL else set(),
                              scratch=cache.scratch_block[group]) for group in kv.pools}
        return cls(cache, plans, SpreadAttention.plan(cp, chunks, spread, kv, cache, device))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               chunk_size: int | None) -> torch.Tensor:
        """Write the step's k, v [N, K, D] to their slots, then [N, Q, D] queries -> [N, Q, D] outputs over the
        layer's paged keys (the chunk windows are in the step's plan, so chunk_size is not needed here)."""
        group = self.cache.groups[layer]
        plan = self.plans[group]
        self.cache.write(layer, plan.write_slots, k, v)
        spread = self.spread if group == FULL else None
        if spread is not None:
            spread.start(layer, q, k, v)  # the peers' answers come while the home chunks attend
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
        if plan.verify is not None:
            self._attend_verify(layer, plan.verify, q, out, scale)
        for prefill in plan.prefills:
            keys, values = self.cache.read(layer, prefill.slots)  # [S, K, D]
            out[prefill.rows] = F.scaled_dot_product_attention(
                q[prefill.rows].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=prefill.mask, scale=scale, enable_gqa=True,
            ).transpose(0, 1)
        if spread is not None:
            spread.finish(layer, q, out)
        return out


    def _attend_verify(self, layer: int, verify: _Verify, q: torch.Tensor, out: torch.Tensor, scale: float) -> None:
        """The verifying chunks' queries [E*U of N] over their windows, in one call; real rows written to out."""
        e, s_max = verify.slots.shape
        keys, values = self.cache.read(layer, verify.slots.flatten())  # [E*S, K, D]
        keys = keys.view(e, s_max, *keys.shape[1:]).transpose(1, 2)  # [E, K, S, D]
        values = values.view(e, s_max, *values.shape[1:]).transpose(1, 2)
        rows = verify.rows.flatten()  # [E*U]
        queries = q.index_select(0, rows).view(e, -1, *q.shape[1:]).transpose(1, 2)  # [E, Q, U, D]
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=verify.mask, scale=scale,
                                                  enable_gqa=True)  # [E, Q, U, D]
        attended = attended.transpose(1, 2).flatten(0, 1)  # [E*U, Q, D]
        out.index_copy_(0, rows[verify.real], attended[verify.real])


def decode_slots(blocks: torch.Tensor, lengths: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [G, W] of each decode's window and its keys' count [G] -> the slots of every key [G, W*B] and the
    mask of real keys [G, 1, 1, W*B] (the padding past a decode's length points anywhere and is masked)."""
    slots = _slots(blocks, block)
    mask = torch.arange(slots.shape[1], device=blocks.device)[None, :] < lengths[:, None]  # [G, W*B]
    return slots, mask[:, None, None, :]


def _plan(chunks: Sequence[ScheduledChunk], kv: KVCacheManager, group: str, device: torch.device, *,
          skip: set[int] | None = None, scratch: int = 0) -> GroupPlan:
    """The group's plan; chunks `skip` (indices: spread over trunks) are only written, their tokens held elsewhere
    to the `scratch` block (herd.engine.context_parallel attends them)."""
    block = kv.block_size
    chunk_size = kv.layout.chunk_size if group != FULL else None
    write: list[int] = []
    decode_rows: list[int] = []
    decode_blocks: list[list[int]] = []  # each decode's window, as blocks
    decode_lengths: list[int] = []
    prefills: list[_Prefill] = []
    verifying: list[tuple[int, int, list[int], torch.Tensor]] = []  # (first row, tokens, window slots, mask)
    row = 0
    for index, chunk in enumerate(chunks):
        # Every position from the window on holds a block (only blocks before the window are freed).
        table = cast("list[int]", kv.table(chunk.seq, group))
        if skip and index in skip:
            write += [table[p // block] * block + p % block if table[p // block] < scratch else scratch * block
                      for p in range(chunk.start, chunk.start + chunk.num_tokens)]
            row += chunk.num_tokens
            continue
        first = chunk.start
        window = kv.window_start(group, first)  # a multiple of the block size
        if chunk.num_tokens == 1:  # the common case, kept cheap: no per-token lists
            write.append(table[first // block] * block + first % block)
            decode_rows.append(row)
            decode_blocks.append(table[window // block : first // block + 1])
            decode_lengths.append(first + 1 - window)
            row += 1
            continue
        end = first + chunk.num_tokens
        write += [table[p // block] * block + p % block for p in range(first, end)]
        mask = attention_mask(torch.arange(first, end), torch.arange(window, end), chunk_size)
        if chunk.drafts:
            window_slots = [table[p // block] * block + p % block for p in range(window, end)]
            verifying.append((row, chunk.num_tokens, window_slots, mask))
        else:
            slots = _slots(_tensor([table[window // block : -(-end // block)]], device), block)[0, : end - window]
            prefills.append(_Prefill(slice(row, row + chunk.num_tokens), slots, to_device(mask, device)))
        row += chunk.num_tokens
    width = max(map(len, decode_blocks), default=0)
    padded: list[int] = []  # [G * W]
    for blocks in decode_blocks:
        padded += blocks
        padded += [0] * (width - len(blocks))
    slots, mask = decode_slots(_tensor(padded, device).view(len(decode_blocks), width),
                               _tensor(decode_lengths, device), block)
    return GroupPlan(write_slots=_tensor(write, device), decode_rows=_tensor(decode_rows, device),
                     decode_slots=slots, decode_mask=mask, prefills=prefills,
                     verify=_verify_plan(verifying, device) if verifying else None)


def _verify_plan(verifying: list[tuple[int, int, list[int], torch.Tensor]], device: torch.device) -> _Verify:
    """The verifying chunks (first row, tokens, window slots, mask [tokens, window]) padded into one batch."""
    width = max(len(slots) for _, _, slots, _ in verifying)
    length = max(n for _, n, _, _ in verifying)
    rows: list[int] = []
    real: list[bool] = []
    padded_slots: list[int] = []
    mask = torch.zeros(len(verifying), 1, length, width, dtype=torch.bool)
    for i, (first, n, slots, chunk_mask) in enumerate(verifying):
        rows += [*range(first, first + n), *[first + n - 1] * (length - n)]
        real += [True] * n + [False] * (length - n)
        padded_slots += slots + [0] * (width - len(slots))
        mask[i, 0, :n, : len(slots)] = chunk_mask
        mask[i, 0, n:, 0] = True  # a padding query sees one key, so its softmax is defined (and dropped)
    count = len(verifying)
    return _Verify(rows=_tensor(rows, device).view(count, length), real=to_device(torch.tensor(real), device),
                   slots=_tensor(padded_slots, device).view(count, width), mask=to_device(mask, device))


def _slots(blocks: torch.Tensor, block: int) -> torch.Tensor:
    """[G, n] block ids -> [G, n*B] the flat cache slot of every token they hold, in order."""
    offsets = torch.arange(block, device=blocks.device)
    return (blocks[:, :, None] * block + offsets).flatten(1)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory without blocking: a copy from pageable memory
    first waits for the stream to drain, which would stall a step prepared while the previous one computes."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _tensor(values: Sequence[object], device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.long), device)
