"""The four MoE stages in plain, vectorised torch (CPU, and the reference for faster backends).

Legend: T tokens, k experts per token, E experts, H hidden, I expert intermediate, R = T*k rows.

Llama 4 semantics: top-k on the raw router logits, the sigmoid of each chosen logit scales the
expert's INPUT (not its output), no renormalisation. Rows are grouped by expert so that each expert
runs one dense matmul over a contiguous slice, and experts with no rows cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Permutation:
    """Where each grouped row came from, and where each expert's rows start."""

    expert_offsets: torch.Tensor  # [E+1] int64: rows of expert e are rows[offsets[e]:offsets[e+1]]
    row_token: torch.Tensor  # [R] int64: the token each grouped row belongs to


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their sigmoid scores: ([T, k] int32, [T, k] logits dtype)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if not 1 <= k <= router_logits.shape[1]:
        raise ValueError(f"k must be in 1..{router_logits.shape[1]} (experts), got {k}")
    top_logits, top_ids = torch.topk(router_logits, k, dim=1)  # [T, k]
    scores = torch.sigmoid(top_logits.float()).to(router_logits.dtype)
    return top_ids.to(torch.int32), scores


def permute(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_scores: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, Permutation]:
    """Group the k copies of every token by expert, each copy already scaled by its score.

    Returns rows [R, H] and the Permutation that `combine` uses to undo it. Within an expert, rows
    keep token order (stable sort), so results do not depend on how a batch was assembled.
    """
    _check_routing(x, topk_ids, topk_scores, num_experts)
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).long()  # [R]
    order = torch.argsort(flat_ids, stable=True)  # [R]
    row_token = order // k  # [R]
    scores = topk_scores.reshape(-1)[order].to(x.dtype)  # [R]
    rows = x.index_select(0, row_token) * scores[:, None]  # [R, H]
    counts = torch.bincount(flat_ids, minlength=num_experts)  # [E]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return rows, Permutation(expert_offsets=offsets, row_token=row_token)


def experts(
    rows: torch.Tensor, expert_offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of each expert over its own rows: [R, H] -> [R, H].

    gate_up [E, H, 2I] and down [E, I, H] hold exactly the experts that expert_offsets [E+1]
    describes: all of a layer's experts, or the subset a shard owns.
    """
    num_experts = gate_up.shape[0]
    if expert_offsets.shape != (num_experts + 1,):
        raise ValueError(
            f"expert_offsets must be [{num_experts + 1}] for {num_experts} experts, "
            f"got {tuple(expert_offsets.shape)}"
        )
    if down.shape[0] != num_experts or down.shape[1] * 2 != gate_up.shape[2]:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not fit together")
    if rows.dim() != 2 or rows.shape[1] != gate_up.shape[1]:
        raise ValueError(f"rows must be [R, {gate_up.shape[1]}], got {tuple(rows.shape)}")
    bounds = expert_offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != rows.shape[0]:
        raise ValueError(f"expert_offsets must run from 0 to {rows.shape[0]} rows, got {bounds[0]}..{bounds[-1]}")
    out = torch.empty_like(rows)
    for e in range(num_experts):
        start, end = bounds[e], bounds[e + 1]
        if end == start:
            continue
        gate, up = (rows[start:end] @ gate_up[e]).chunk(2, dim=-1)  # [n, I] each
        out[start:end] = (up * F.silu(gate)) @ down[e]
    return out


def combine(out_rows: torch.Tensor, permutation: Permutation, num_tokens: int) -> torch.Tensor:
    """Scatter expert outputs back to their tokens, summing over the k choices: [R, H] -> [T, H]."""
    if out_rows.shape[0] != permutation.row_token.shape[0]:
        raise ValueError(f"{out_rows.shape[0]} output rows for {permutation.row_token.shape[0]} permuted rows")
    out = torch.zeros(num_tokens, out_rows.shape[1], dtype=out_rows.dtype, device=out_rows.device)
    return out.index_add_(0, permutation.row_token, out_rows)


def _check_routing(x: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, num_experts: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or ids.shape != scores.shape:
        raise ValueError(
            f"topk_ids {tuple(ids.shape)} and topk_scores {tuple(scores.shape)} must both be [{x.shape[0]}, k]"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in 0..{num_experts - 1}, got {int(ids.min())}..{int(ids.max())}")
