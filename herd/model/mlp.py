"""SwiGLU feed-forward: the shared expert of MoE layers and the dense MLP of Maverick's other layers."""

from __future__ import annotations

import torch
from torch import nn

from herd.kernels import swiglu
from herd.model.lora_batch import LoRAScope


class FeedForward(nn.Module):
    """down(silu(gate(x)) * up(x)); attribute names match the checkpoint's keys."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoRAScope | None = None) -> torch.Tensor:
        """[T, H] -> [T, H]; `lora`: each token's adapter deltas on the three projections."""
        if lora is None:
            out: torch.Tensor = self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
            return out
        act = swiglu(lora.add("gate_proj", x, self.gate_proj(x)), lora.add("up_proj", x, self.up_proj(x)))
        return lora.add("down_proj", act, self.down_proj(act))
