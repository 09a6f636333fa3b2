"""`QuantizedLinear`: an nn.Linear whose weight stays int4 or FP8, as herd.model.quant.layout stores it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from herd.kernels import QuantizedTensor, quantized_matmul
from herd.model.quant.layout import keep_storage_dtypes, linear_storage


class QuantizedLinear(nn.Module):
    """y = x @ W with W [in, out] stored int4 or FP8 (no bias: Llama 4's feed-forward has none)."""

    # Buffers (herd.model.quant.layout.linear_storage): int4 holds weight_packed and weight_scale, FP8 weight and
    # weight_scale.
    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight: torch.Tensor

    def __init__(self, in_features: int, out_features: int, scheme: str, group: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.group = in_features, out_features, scheme, group
        for name, (shape, dtype) in linear_storage(scheme, in_features, out_features, group).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype))

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight [in, out]."""
        if self.scheme == "int4":
            return QuantizedTensor("int4", self.weight_packed, self.weight_scale, self.in_features, self.group)
        return QuantizedTensor("fp8", self.weight.t(), self.weight_scale.t(), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out]."""
        flat = x.reshape(-1, self.in_features)
        return quantized_matmul(flat, self.quantized).reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedLinear:
        keep_storage_dtypes(self, fn)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
