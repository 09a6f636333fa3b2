"""Causal attention over given keys, with Llama 4's chunked local masking: the arithmetic every KV cache shares.

Legend: T query tokens, S key tokens, N query heads, K key/value heads, D head dim. Masks are built from
positions, so the same code serves a full prompt, one decode step against a cache, and chunked prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """Causal (optionally chunk-local) GQA attention: q [T, N, D], k/v [S, K, D] -> [T, N, D]."""
    visible = attention_mask(q_positions, k_positions, chunk_size)  # [T, S]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # [N, T, D], [K, S, D]
        attn_mask=visible, scale=q.shape[-1] ** -0.5, enable_gqa=True,
    )  # [N, T, D]
    return out.transpose(0, 1)


def attention_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """[T, S] bool: key visible to query. Chunks are fixed absolute windows [c*C, (c+1)*C)."""
    visible = k_positions[None, :] <= q_positions[:, None]
    if chunk_size is not None:
        visible &= (k_positions[None, :] // chunk_size) == (q_positions[:, None] // chunk_size)
    return visible
