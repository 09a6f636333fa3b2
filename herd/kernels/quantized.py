"""Weights kept quantised (int4 or FP8): `QuantizedTensor`, and `quantize` to make one from floats.

Legend: Din inputs, Dout outputs, E experts.

A `QuantizedTensor` is logically [..., Din, Dout], the right operand of x @ W (Herd's fused experts are
[E, H, 2I] and [E, I, H]; an nn.Linear weight [out, in] is its transpose). How `values` and `scales` are
laid out is its scheme's to say (herd.kernels.schemes); dequantising one runs on its device's backend
(herd.kernels.backend), as do the matmuls with it (herd.kernels.api.quantized_matmul and experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.kernels import int4
from herd.kernels.backend import backend_for
from herd.kernels.schemes import get_scheme


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight [..., Din, Dout] stored quantised: `values` and `scales` as its scheme lays them out."""

    scheme: str
    values: torch.Tensor
    scales: torch.Tensor
    d_in: int
    group: int = int4.GROUP

    def __post_init__(self) -> None:
        fits = get_scheme(self.scheme).fits(self.values, self.scales, self.d_in, self.group)
        if not fits or self.values.device != self.scales.device:
            raise ValueError(
                f"{self.scheme} weight of {self.d_in} inputs does not fit its tensors: values "
                f"{self.values.dtype} {tuple(self.values.shape)}, scales {self.scales.dtype} {tuple(self.scales.shape)}"
                f" on {self.values.device} / {self.scales.device}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape [..., Din, Dout]."""
        return (*self.values.shape[:-2], self.d_in, self.values.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes held: values and scales."""
        return self.values.nbytes + self.scales.nbytes

    def __getitem__(self, index: int) -> QuantizedTensor:
        """One slice of the leading dimension (one expert): [..., Din, Dout] -> [Din, Dout] for [E, Din, Dout]."""
        if self.values.dim() < 3:
            raise IndexError(f"a {self.scheme} weight of shape {self.shape} has no leading dimension to index")
        return QuantizedTensor(self.scheme, self.values[index], self.scales[index], self.d_in, self.group)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight as floats [..., Din, Dout] in `dtype`, by its device's backend."""
        return backend_for(self.device).dequantize(self, dtype)

    def to(self, device: str | torch.device) -> QuantizedTensor:
        return QuantizedTensor(self.scheme, self.values.to(device), self.scales.to(device), self.d_in, self.group)


def quantize(weight: torch.Tensor, scheme: str) -> QuantizedTensor:
    """Quantise a float weight [..., Din, Dout] by the registered method `scheme`."""
    values, scales = get_scheme(scheme).quantize(weight)
    return QuantizedTensor(scheme, values, scales, weight.shape[-2])
