"""Llama 4 self-attention: GQA with iRoPE.

Legend: T query tokens, S key tokens, N query heads, K key/value heads, D head dim, H hidden.

RoPE layers rotate q and k, L2-normalise them (when use_qk_norm) and attend only within their fixed
absolute chunk of `attention_chunk_size` tokens. NoPE layers (every fourth) skip RoPE, attend to the
whole causal prefix, and scale queries by a temperature that grows with log(position) so attention
stays sharp at long context. Masks are built from positions, so the same code serves a full prompt,
one decode step against a cache, and (later) chunked prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.config import TextConfig
from herd.model.kv_cache import LayerKV
from herd.model.norm import rms_normalize
from herd.model.rope import apply_rotary


class Attention(nn.Module):
    """One layer's attention; attribute names match the checkpoint's `self_attn.*` keys."""

    def __init__(self, config: TextConfig, layer: int) -> None:
        super().__init__()
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * dim, bias=bias)
        self.o_proj = nn.Linear(heads * dim, config.hidden_size, bias=bias)
        self.head_dim = dim
        self.eps = config.rms_norm_eps
        self.use_rope = config.use_rope[layer]
        self.qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale = config.floor_scale
        self.attn_scale = config.attn_scale
        self.chunk_size = config.chunk_size(layer)

    def project(
        self, x: torch.Tensor, positions: torch.Tensor, rot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, N, D], k [T, K, D], v [T, K, D] for x [T, H] at positions [T], ready to attend."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, -1, self.head_dim)
        k = self.k_proj(x).view(t, -1, self.head_dim)
        v = self.v_proj(x).view(t, -1, self.head_dim)
        if self.use_rope:
            q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        if self.qk_norm:
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        if self.temperature_tuning:
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scales[:, None, None]).to(q.dtype)
        return q, k, v

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rot: torch.Tensor, cache: LayerKV | None = None
    ) -> torch.Tensor:
        """[T, H] -> [T, H]; with a cache, attends to everything cached before plus these tokens."""
        q, k, v = self.project(x, positions, rot)
        key_positions = positions
        if cache is not None:
            k, v, key_positions = cache.append(k, v, positions)
        out = attend(q, k, v, positions, key_positions, self.chunk_size)  # [T, N, D]
        return self.o_proj(out.reshape(x.shape[0], -1))


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
