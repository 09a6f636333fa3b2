"""One Llama 4 decoder layer: pre-norm attention and pre-norm feed-forward (MoE or dense), residual."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
        return self.begin(x, positions, rot, kv, lora)()

    def begin(
        self, x: torch.Tensor, positions: torch.Tensor, rot: torch.Tensor, kv: KVContext | None = None,
        lora: LoRABatch | None = None,
    ) -> Callable[[], torch.Tensor]:
        """The layer up to the MoE's wait for its routed rows (attention, the router, the rows sent, the shared
        expert); the function returned finishes it: [T, H]. A dense layer is done at once."""
        attn_lora = None if lora is None else lora.scope(self.index, "self_attn.")
        ff_lora = None if lora is None else lora.scope(self.index, "feed_forward.")
        attended: torch.Tensor = self.self_attn(self.input_layernorm(x), positions, rot, kv, attn_lora)  # [T, H]
        h = x + attended
        if isinstance(self.feed_forward, MoE):
            mixing = self.feed_forward.begin(self.post_attention_layernorm(h), ff_lora)
            return lambda: h + mixing()
        out = h + self.feed_forward(self.post_attention_layernorm(h), ff_lora)  # [T, H]
        return lambda: out

    def idle(self, x: torch.Tensor, kv: KVContext | None = None) -> Callable[[], torch.Tensor]:
        """An empty micro-batch's turn (x [0, H]): no attention, but a global layer's KV context is still given its
        empty queries (context parallelism: the trunks exchange at every global layer); a MoE layer still sends its
        executor no rows."""
        if kv is not None:
            self.self_attn.idle(kv, x)
        if isinstance(self.feed_forward, MoE):
            return self.feed_forward.idle(x)
        return lambda: x
