"""EAGLE-3 drafting: the draft head (herd.model.eagle3) kept in step with the target over the engine's paged cache.

Legend: M catch-up rows of a step, C sequences caught up, T_c rows of one of them, S keys, G sequences drafting,
H the head's width, N query heads, K key/value heads, D head dim, Vd the draft vocabulary.

The head's keys and values live in the target's paged cache as one more layer on the FULL group
(PagedKVCache.add_layer): every block a sequence holds in the target's full-attention layers holds the head's KV for
the same positions, so block tables, prefix caching, preemption and copy-on-write of forked sequences carry it.
After every step (propose):
- catch-up: each position p the step kept whose next token is known gets the head's row at p (the embedding of
  token p + 1 beside fc(the target's aux hidden states at p)), its KV written at p. One forward for the whole step:
  projections and MLP over all M rows together, attention padded over the C sequences (causal within a chunk, over
  the head's KV already there for the earlier positions).
- drafting: a sequence wanting k drafts, caught up to its position L - 2 (L known tokens), takes d_0 from the head's
  output there, then k - 1 chained rows (d_j beside the previous row's output, at position L - 1 + j) whose KV stays
  in temporary tensors: those positions have no blocks yet, and the verifying step writes the target's there. All
  sequences go together, one batched row per depth; drafts are greedy (deterministic), for which the engine's
  verification is exact at any temperature.
Nothing is kept per sequence between steps beyond the paged KV (forget has nothing to drop).

Prefix caching: the head's KV at the last position of a block depends on the token after the block, and is cached
with the block. A sequence that reuses a cached prefix and continues it with another token reads that one key as the
first sequence wrote it, so it may draft slightly worse (never a wrong output: the target verifies every draft).
A position kept without its next token known (none in the engine's normal flow) is never caught up; its key stays
stale, with the same effect.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from herd.engine.kv_cache_manager import FULL, KVCacheManager
from herd.engine.paged_attention import to_device
from herd.engine.paged_kv import PagedKVCache
from herd.engine.sequence import Sequence
from herd.engine.speculative.proposer import StepRows
from herd.model.eagle3 import Eagle3Head, load_eagle3_for
from herd.model.llama4 import Llama4Model


@dataclass(frozen=True)
class Drafted:
    """What one propose drafted, per wanted sequence in order."""

    tokens: list[list[int]]
    """Target token ids (empty where the sequence wanted none or was not caught up to its last known token)."""
    logits: list[torch.Tensor]
    """[len(tokens[i]), Vd] float, on the head's device: the draft-vocabulary logits each draft is the argmax of."""


@dataclass(frozen=True)
class _Segment:
    """One sequence's catch-up rows: positions start..end-1, rows first..first + end - start - 1 of the batch."""

    seq: Sequence
    first: int
    start: int
    end: int


class Eagle3Proposer:
    """Drafts with an EAGLE-3 head whose KV is a layer of the target's paged cache (herd.engine.speculative)."""

    def __init__(self, head: Eagle3Head, kv: KVCacheManager, cache: PagedKVCache) -> None:
        _require_full(kv)
        self.head = head
        self.kv = kv
        self.cache = cache
        self.layer = cache.add_layer(FULL, head.num_kv_heads, head.head_dim)
        """The head's layer index in the paged cache."""
        self.aux_layers: tuple[int, ...] = head.aux_layers

    @classmethod
    def from_path(cls, path: str | Path, target: Llama4Model, kv: KVCacheManager,
                  cache: PagedKVCache) -> Eagle3Proposer:
        """Load the head in `path` for `target` (its dtype and device; its embedding when the head has none);
        ValueError when the head does not fit the target or the cache has no full-attention group."""
        _require_full(kv)
        return cls(load_eagle3_for(path, target), kv, cache)

    def propose(self, step: StepRows, wanted: Seq[tuple[Sequence, int]]) -> list[list[int]]:
        """Catch up on the step, then up to k greedy drafts for each (sequence, k)."""
        return self.draft(step, wanted).tokens

    def forget(self, seq: Sequence) -> None:
        """Nothing is kept per sequence: its draft KV goes with its blocks."""
        return None

    @torch.inference_mode()
    def draft(self, step: StepRows, wanted: Seq[tuple[Sequence, int]]) -> Drafted:
        """propose, with the draft logits behind every draft."""
        last = self._catch_up(step)  # request id -> (its last caught-up position, that row's output [H])
        active: list[int] = []  # indices into wanted that draft
        for i, (seq, k) in enumerate(wanted):
            caught = last.get(seq.request_id)
            if k > 0 and caught is not None and caught[0] == len(seq.prompt_ids) + len(seq.output_ids) - 2:
                active.append(i)
        tokens: list[list[int]] = [[] for _ in wanted]
        logits: list[torch.Tensor] = [torch.empty(0, self.head.config.draft_vocab_size) for _ in wanted]
        if not active:
            return Drafted(tokens, logits)
        seqs = [wanted[i][0] for i in active]
        depth = max(wanted[i][1] for i in active)
        chosen, scores = self._chain(seqs, torch.stack([last[s.request_id][1] for s in seqs]), depth)
        for row, i in enumerate(active):
            k = wanted[i][1]
            tokens[i] = chosen[row][:k]
            logits[i] = scores[row, :k]
        return Drafted(tokens, logits)

    def _catch_up(self, step: StepRows) -> dict[str, tuple[int, torch.Tensor]]:
        """The head's rows for every kept position with a known next token; KV written. Per sequence caught up:
        its last position and that row's output [H]."""
        aux_rows: list[int] = []
        ids: list[int] = []
        positions: list[int] = []
        segments: list[_Segment] = []
        row = 0
        for chunk, kept in zip(step.chunks, step.kept, strict=True):
            seq, base = chunk.seq, row
            row += chunk.num_tokens
            if seq.request_id in step.finished or seq.is_finished:
                continue
            known = seq.prompt_ids + seq.output_ids
            end = min(chunk.start + kept, len(known) - 1)  # position p needs token p + 1
            if end <= chunk.start:
                continue
            segments.append(_Segment(seq, len(ids), chunk.start, end))
            aux_rows += range(base, base + end - chunk.start)
            ids += known[chunk.start + 1 : end + 1]
            positions += range(chunk.start, end)
        if not segments or step.aux_hidden is None:
            return {}
        head, device = self.head, step.aux_hidden.device
        hidden = head.combine(step.aux_hidden.index_select(0, _tensor(aux_rows, device)))  # [M, H]
        slots = self._write_slots(segments, device)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            dtype = self.cache.dtype
            self.cache.write(self.layer, slots, k.to(dtype), v.to(dtype))
            return self._attend(q, segments)

        out = head(_tensor(ids, device), hidden, _tensor(positions, device), attend)  # [M, H]
        return {s.seq.request_id: (s.end - 1, out[s.first + s.end - s.start - 1]) for s in segments}

    def _write_slots(self, segments: list[_Segment], device: torch.device) -> torch.Tensor:
        """[M] the cache slot of every catch-up row."""
        block = self.kv.block_size
        slots: list[int] = []
        for s in segments:
            table = self.kv.table(s.seq, FULL)
            slots += [_block(table, p // block) * block + p % block for p in range(s.start, s.end)]
        return _tensor(slots, device)

    def _keys(self, seqs: list[Sequence], lengths: list[int], device: torch.device,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head's paged keys and values of positions 0..length-1 of each sequence, padded: k, v [C, K, S, D]
        and the mask of real keys [C, S]."""
        block, width = self.kv.block_size, max(lengths)
        blocks = -(-width // block)
        rows = []
        for seq, length in zip(seqs, lengths, strict=True):
            table = self.kv.table(seq, FULL)
            used = [_block(table, i) for i in range(-(-length // block))]
            rows.append(used + [used[0]] * (blocks - len(used)))  # padding points at a real block, masked
        table_t = _tensor(rows, device)  # [C, W]
        slots = (table_t[:, :, None] * block + torch.arange(block, device=device)).flatten(1)[:, :width]  # [C, S]
        keys, values = self.cache.read(self.layer, slots.flatten())  # [C*S, K, D]
        shape = (len(seqs), width, *keys.shape[1:])
        real = torch.arange(width, device=device)[None, :] < _tensor(lengths, device)[:, None]  # [C, S]
        return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2), real

    def _attend(self, q: torch.Tensor, segments: list[_Segment]) -> torch.Tensor:
        """Catch-up queries [M, N, D] -> outputs [M, N, D]: each sequence's rows over its keys 0..end-1, causally."""
        device, c = q.device, len(segments)
        keys, values, _ = self._keys([s.seq for s in segments], [s.end for s in segments], device)
        t_max = max(s.end - s.start for s in segments)
        # Padded queries sit at position 0 (they see key 0, so no row is all masked) and are dropped after.
        q_pos = torch.zeros(c, t_max, dtype=torch.long)
        index = torch.zeros(c, t_max, dtype=torch.long)  # batch row of each padded query
        for i, s in enumerate(segments):
            n = s.end - s.start
            q_pos[i, :n] = torch.arange(s.start, s.end)
            index[i, :n] = torch.arange(s.first, s.first + n)
        q_pos, index = to_device(q_pos, device), to_device(index, device)
        queries = q.index_select(0, index.flatten()).view(c, t_max, *q.shape[1:]).transpose(1, 2)  # [C, N, T, D]
        k_pos = torch.arange(keys.shape[2], device=device)
        mask = (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [C, 1, T, S]
        attended = F.scaled_dot_product_attention(queries, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                                  scale=q.shape[-1] ** -0.5, enable_gqa=True)  # [C, N, T, D]
        attended = attended.transpose(1, 2)  # [C, T, N, D]
        out = torch.empty_like(q)
        for i, s in enumerate(segments):
            out[s.first : s.first + s.end - s.start] = attended[i, : s.end - s.start]
        return out

    def _chain(self, seqs: list[Sequence], out: torch.Tensor, depth: int) -> tuple[list[list[int]], torch.Tensor]:
        """From each sequence's output at its position L - 2 [G, H]: `depth` greedy drafts [G][depth] and their
        draft logits [G, depth, Vd]. Rows past the first attend to the paged keys of 0..L-2 and their own chain's
        keys, kept here (their positions have no blocks)."""
        head, device = self.head, out.device
        lengths = [len(s.prompt_ids) + len(s.output_ids) for s in seqs]  # L: the first draft is token L
        keys, values, real = self._keys(seqs, [n - 1 for n in lengths], device)  # [G, K, S, D], [G, S]
        keys, values = keys.to(out.dtype), values.to(out.dtype)
        positions = _tensor([n - 1 for n in lengths], device)  # [G]
        scores = [head.draft_logits(out)]  # [G, Vd] each
        chosen = [head.to_target(scores[-1].argmax(-1))]  # [G] each
        real = torch.cat([real, torch.ones_like(real[:, :1])], dim=1)  # [G, S + 1]: and the chained row's own key
        for _ in range(depth - 1):

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                """One query per sequence [G, N, D] over its paged keys, the chain's so far, and its own."""
                nonlocal keys, values, real
                keys = torch.cat([keys, k[:, :, None]], dim=2)  # [G, K, S + j, D]
                values = torch.cat([values, v[:, :, None]], dim=2)
                attended = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=real[:, None, None],
                                                          scale=q.shape[-1] ** -0.5, enable_gqa=True)  # [G, N, 1, D]
                real = torch.cat([real, real[:, -1:]], dim=1)
                return attended.squeeze(2)

            out = head(chosen[-1], out, positions, attend)  # [G, H]
            scores.append(head.draft_logits(out))
            chosen.append(head.to_target(scores[-1].argmax(-1)))
            positions = positions + 1
        ids: list[list[int]] = torch.stack(chosen, dim=1).tolist()  # the one host sync of the drafts
        return ids, torch.stack(scores, dim=1)


def _require_full(kv: KVCacheManager) -> None:
    if FULL not in kv.pools:
        raise ValueError("an EAGLE-3 head keeps its KV on the target's full-attention blocks, and this target has "
                         "no full-attention layers")


def _block(table: list[int | None], index: int) -> int:
    """A FULL table's block (full-attention tables hold every block from position 0)."""
    block = table[index]
    assert block is not None, "a full-attention block table has no released blocks"
    return block


def _tensor(values: Seq[object], device: torch.device) -> torch.Tensor:
    """Host ints on `device` (through pinned memory without blocking, as the step's own plans go)."""
    return to_device(torch.tensor(values, dtype=torch.long), device)
