"""One Llama 4 decoder layer: pre-norm attention and pre-norm feed-forward (MoE or dense), residual."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from herd.model.attention import Attention
from herd.model.config import TextConfig
from herd.model.kv_cache import KVContext
from herd.model.lora_batch import LoRABatch
from herd.model.mlp import FeedForward
from herd.model.moe import MoE
from herd.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    """Attribute names match the checkpoint's `model.layers.{i}.*` keys."""

    def __init__(self, config: TextConfig, layer: int, expert_ids: Sequence[int]) -> None:
        super().__init__()
        self.index = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward: MoE | FeedForward = (
            MoE(config, layer, expert_ids)
            if config.is_moe(layer)
            else FeedForward(config.hidden_size, config.intermediate_size_mlp)
        )

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rot: torch.Tensor, kv: KVContext | None = None,
        lora: LoRABatch | None = None,
    ) -> torch.Tensor:
        """[T, H] -> [T, H]; `lora`: the forward's per-token adapters (herd.model.lora_batch)."""
        attn_lora = None if lora is None else lora.scope(self.index, "self_attn.")
        ff_lora = None if lora is None else lora.scope(self.index, "feed_forward.")
        attended: torch.Tensor = self.self_attn(self.input_layernorm(x), positions, rot, kv, attn_lora)  # [T, H]
        h = x + attended
        mixed: torch.Tensor = self.feed_forward(self.post_attention_layernorm(h), ff_lora)  # [T, H]
        return h + mixed
