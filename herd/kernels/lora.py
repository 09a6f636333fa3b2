"""LoRA deltas for a batch whose rows use different adapters: gathered per row (BGMV-style), in torch.

Legend: T rows (tokens, or the R = T*k expert rows), S stacked entries (one per adapter slot, or per
(slot, expert) pair for routed experts), r the stack's rank (the largest resident rank; smaller ranks are
padded with zeros), Din / Dout the adapted weight's inputs / outputs.

A linear's delta for row t is `scaling[i] * B[i] @ (A[i] @ x[t])` with i = index[t], so one call serves any
mix of adapters, and an entry whose factors are zero (the base model's) adds exactly zero. Three ways to compute
it, compared by bench/lora_delta.py (CPU, one thread, Din = Dout = 2048, r = 16):
- lora_delta (gathered, BGMV-style): each row gathers its own factors, r*(Din+Dout) numbers copied per row.
  Fastest for one row; from 8 rows on 3-45x slower than the others, and over the base projection at 128.
- lora_delta_grouped (SGMV-style): one pair of matmuls per entry present. Fastest for many slots and long
  batches, but the host reads which entries are present: a sync per call on an accelerator.
- lora_delta_masked: every entry's A at once, each row keeping its own r columns; no gather, no sync, within
  about 1x-2.4x of grouped for up to 8 slots. The model's linears use it (herd.model.lora_batch).
The routed experts gather (their entries are (slot, expert) pairs, too many to mask over).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAStack:
    """One adapted weight's resident adapters, stacked so that rows can gather theirs."""

    a: torch.Tensor  # [S, r, Din]
    b: torch.Tensor  # [S, Dout, r]
    scaling: torch.Tensor  # [S], in a's dtype: lora_alpha / r (or / sqrt(r) with rsLoRA); 0 where unused


@dataclass(frozen=True)
class ExpertsLoRA:
    """The routed experts' adapters of one MoE layer, for rows grouped by expert.

    Stacks hold (slot, expert) entries: entry slot * E + expert. `row_index` [R] names each row's entry.
    """

    gate_up: LoRAStack | None  # A [S*E, r, H], B [S*E, 2I, r]
    down: LoRAStack | None  # A [S*E, r, I], B [S*E, H, r]
    row_index: torch.Tensor  # [R] int64


def lora_delta(x: torch.Tensor, stack: LoRAStack, index: torch.Tensor) -> torch.Tensor:
    """Every row's own adapter delta, gathered: x [T, Din], index [T] -> [T, Dout] in x's dtype."""
    a = stack.a.index_select(0, index)  # [T, r, Din]
    b = stack.b.index_select(0, index)  # [T, Dout, r]
    scaling = stack.scaling.index_select(0, index)  # [T]
    low = torch.bmm(a, x.unsqueeze(-1)) * scaling[:, None, None]  # [T, r, 1]
    return torch.bmm(b, low).squeeze(-1)  # [T, Dout]


def lora_delta_masked(x: torch.Tensor, stack: LoRAStack, index: torch.Tensor) -> torch.Tensor:
    """The same delta through every entry's A at once, each row keeping only its own entry's r columns:
    x [T, Din] -> [T, Dout]. Costs T*S*r*(Din+Dout) multiply-adds, gathers no factors and reads no values on
    the host; for a few slots that is a small fraction of the base projection."""
    entries, rank, d_in = stack.a.shape
    low = (x @ stack.a.reshape(entries * rank, d_in).T).view(-1, entries, rank)  # [T, S, r]
    own = index[:, None] == torch.arange(entries, device=x.device)  # [T, S]
    weight = torch.where(own, stack.scaling[None, :], 0).to(x.dtype)  # [T, S]: scaling on its own entry
    low = (low * weight[:, :, None]).view(-1, entries * rank)  # [T, S*r]
    b = stack.b.permute(1, 0, 2).reshape(-1, entries * rank)  # [Dout, S*r]
    return low @ b.T


def lora_delta_grouped(x: torch.Tensor, stack: LoRAStack, index: torch.Tensor) -> torch.Tensor:
    """The same delta computed per entry present (SGMV-style): one pair of matmuls per entry, no gathered factors.

    The host reads which entries are present (a sync on an accelerator). Kept for bench/lora_delta.py, which
    compares it with lora_delta.
    """
    out = torch.zeros(x.shape[0], stack.b.shape[1], dtype=x.dtype, device=x.device)  # [T, Dout]
    for entry in torch.unique(index).tolist():
        rows = (index == entry).nonzero().squeeze(-1)  # [n]
        low = (x.index_select(0, rows) @ stack.a[entry].T) * stack.scaling[entry]  # [n, r]
        out.index_copy_(0, rows, low @ stack.b[entry].T)
    return out


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """One adapter on every row, the plain way: scaling * (x @ A.T) @ B.T; x [T, Din] -> [T, Dout]."""
    return scaling * (x @ a.T) @ b.T
