"""LoRA deltas for a batch whose rows use different adapters: gathered per row (BGMV-style), in torch.

Legend: T rows (tokens, or the R = T*k expert rows), S stacked entries (one per adapter slot, or per
(slot, expert) pair for routed experts), r the stack's rank (the largest resident rank; smaller ranks are
padded with zeros), Din / Dout the adapted weight's inputs / outputs.

A linear's delta for row t is `scaling[i] * B[i] @ (A[i] @ x[t])` with i = index[t]: each row gathers its own
factors, so one call serves any mix of adapters. An entry whose factors are zero (the base model's) adds
exactly zero. Gathering copies r*(Din+Dout) numbers per row, which is cheap for decode-sized batches and grows
with prefill chunks; bench/lora_delta.py compares it with grouping rows by entry (measured there, the choice
is said in herd.model.lora_bank).
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
