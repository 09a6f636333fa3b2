"""Llama 4 self-attention: GQA with iRoPE.

Legend: T query tokens, S key tokens, N query heads, K key/value heads, D head dim, H hidden.

RoPE layers rotate q and k, L2-normalise them (when use_qk_norm) and attend only within their fixed
absolute chunk of `attention_chunk_size` tokens. NoPE layers (every fourth) skip RoPE, attend to the
whole causal prefix, and scale queries by a temperature that grows with log(position) so attention
stays sharp at long context. Where keys and values are kept is the KV context's business (the model's
contiguous cache, or the engine's paged one): a layer projects, hands over, and projects back.
"""

from __future__ import annotations

import torch
from torch import nn

from herd.model.causal_attention import attend
from herd.model.config import TextConfig
from herd.model.kv_cache import KVContext
from herd.model.lora_batch import LoRAScope
from herd.model.norm import rms_normalize
from herd.model.rope import apply_rotary


class Attention(nn.Module):
    """One layer's attention; attribute names match the checkpoint's `self_attn.*` keys."""

    def __init__(self, config: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * dim, bias=bias)
        self.o_proj = nn.Linear(heads * dim, config.hidden_size, bias=bias)
        self.head_dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.eps = config.rms_norm_eps
        self.use_rope = config.use_rope[layer]
        self.qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale = config.floor_scale
        self.attn_scale = config.attn_scale
        self.chunk_size = config.chunk_size(layer)

    def project(
        self, x: torch.Tensor, positions: torch.Tensor, rot: torch.Tensor, lora: LoRAScope | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, N, D], k [T, K, D], v [T, K, D] for x [T, H] at positions [T], ready to attend."""
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, N*D], [T, K*D], [T, K*D]
        if lora is not None:
            q, k, v = lora.add("q_proj", x, q), lora.add("k_proj", x, k), lora.add("v_proj", x, v)
        q, k, v = q.view(t, -1, self.head_dim), k.view(t, -1, self.head_dim), v.view(t, -1, self.head_dim)
        if self.use_rope:
            q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        if self.qk_norm:
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        if self.temperature_tuning:
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scales[:, None, None]).to(q.dtype)
        return q, k, v

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rot: torch.Tensor, kv: KVContext | None = None,
        lora: LoRAScope | None = None,
    ) -> torch.Tensor:
        """[T, H] -> [T, H]; with a KV context, attends to everything it holds for this layer plus these
        tokens (which it keeps); without one, to these tokens alone. `lora`: each token's adapter deltas."""
        q, k, v = self.project(x, positions, rot, lora)
        if kv is None:
            out = attend(q, k, v, positions, positions, self.chunk_size)  # [T, N, D]
        else:
            out = kv.attend(self.layer, q, k, v, positions, self.chunk_size)
        flat = out.reshape(x.shape[0], -1)  # [T, N*D]
        projected: torch.Tensor = self.o_proj(flat)  # [T, H]
        return projected if lora is None else lora.add("o_proj", flat, projected)

    def idle(self, kv: KVContext, x: torch.Tensor) -> None:
        """A global layer's turn in a forward of no tokens (x [0, H], the forward's dtype): the KV context attends no
        queries (context parallelism exchanges with the other trunks all the same); chunked layers do nothing."""
        if self.chunk_size is not None:
            return
        q = x.new_empty(0, self.heads, self.head_dim)  # [0, N, D]
        k = x.new_empty(0, self.kv_heads, self.head_dim)  # [0, K, D]
        kv.attend(self.layer, q, k, k, torch.empty(0, dtype=torch.long, device=x.device), None)
