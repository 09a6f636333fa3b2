"""Quantisation methods by name: how each stores a weight, quantises one, and dequantises and multiplies by it.

Legend: Din inputs, Dout outputs, G = ceil(Din / group) int4 groups, R rows.

A `Scheme` here is torch code that runs on every device. A backend with kernels of its own for a method
(CuPy's int4, herd.kernels.cupy_moe) subclasses it and hands the subclass to its `Backend`; every other
backend runs the registered one. A new method is a `Scheme` subclass given to `register`, nothing else:
QuantizedTensor, herd.kernels.quantize and every backend find it here.

- int4 (weight-only, W4A16): values uint8 [..., ceil(Din/2), Dout] packed as herd.kernels.int4 says, scales
  bfloat16 [..., G, Dout]. Activations stay in their float dtype; the weight is dequantised to it.
- fp8 (W8A8): values e4m3 [..., Din, Dout], scales float32 [..., 1, Dout]; each row of x is scaled to e4m3
  on the fly (dynamic per-token scaling). On a GPU with FP8 support (sm_89+) torch._scaled_mm runs it with
  the row and column scales; elsewhere it is emulated in float32 with the weight dequantised: the same
  numbers, slower.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from herd.kernels import fp8, int4

if TYPE_CHECKING:
    from herd.kernels.quantized import QuantizedTensor

log = logging.getLogger(__name__)


class Scheme(ABC):
    """One quantisation method, in torch. Weights are [..., Din, Dout], the right operand of x @ W."""

    name: ClassVar[str]

    @abstractmethod
    def fits(self, values: torch.Tensor, scales: torch.Tensor, d_in: int, group: int) -> bool:
        """Whether `values` and `scales` are this method's storage of a weight with `d_in` inputs."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A float weight [..., Din, Dout] -> (values, scales) as this method stores them."""

    @abstractmethod
    def dequantize(self, weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight as floats [..., Din, Dout] in `dtype`."""

    def matmul(self, x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
        """x [R, Din] @ weight [Din, Dout] -> [R, Dout] in x's dtype (inputs checked by herd.kernels.api).

        By default the weight is dequantised to x's dtype through its own backend (weight.dequantize).
        """
        return x @ weight.dequantize(x.dtype)


class Int4(Scheme):
    """Symmetric int4, one bfloat16 scale per group of inputs, two values a byte (herd.kernels.int4)."""

    name = "int4"

    def fits(self, values: torch.Tensor, scales: torch.Tensor, d_in: int, group: int) -> bool:
        lead, d_out = tuple(values.shape[:-2]), values.shape[-1]
        return (values.dtype == torch.uint8 and values.shape[-2] == -(-d_in // 2)
                and tuple(scales.shape) == (*lead, -(-d_in // group), d_out))

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return int4.quantize_int4(weight)

    def dequantize(self, weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return int4.dequantize_int4(weight.values, weight.scales, weight.d_in, group=weight.group, dtype=dtype)


class Fp8(Scheme):
    """e4m3 weights with a scale per output channel, activations scaled to e4m3 per token (herd.kernels.fp8)."""

    name = "fp8"

    def fits(self, values: torch.Tensor, scales: torch.Tensor, d_in: int, group: int) -> bool:
        lead, d_out = tuple(values.shape[:-2]), values.shape[-1]
        return values.dtype == fp8.E4M3 and values.shape[-2] == d_in and tuple(scales.shape) == (*lead, 1, d_out)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values come out as an output-major tensor's view: column-major [Din, Dout], as FP8 GEMMs want it."""
        values, scales = fp8.quantize_fp8(weight)
        return values.transpose(-1, -2).contiguous().transpose(-1, -2), scales

    def dequantize(self, weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return fp8.dequantize_fp8(weight.values, weight.scales, dtype=dtype)

    def matmul(self, x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
        values, scales = fp8.quantize_rows(x)  # per-token e4m3, on every device
        if x.is_cuda and _scaled_mm_works(x.device, x.dtype):
            try:
                out: torch.Tensor = torch._scaled_mm(values, weight.values, scale_a=scales,
                                                     scale_b=weight.scales.float(), out_dtype=x.dtype)
                return out
            except RuntimeError as err:  # a shape this GEMM refuses (sizes not multiples of 16): emulate below
                if weight.shape not in _REFUSED_SHAPES:
                    _REFUSED_SHAPES.add(weight.shape)
                    log.warning("torch._scaled_mm refused x %s @ %s (%s); this shape runs emulated FP8 (dequantised)",
                                tuple(x.shape), weight.shape, err)
        product = (values.float() * scales) @ weight.dequantize(torch.float32)  # the GPU's numbers, in float32
        return product.to(x.dtype)


SCHEMES: dict[str, Scheme] = {}
"""Every quantisation method, by name."""


def register(scheme: Scheme) -> Scheme:
    """Make `scheme` known by its name (replacing one of the same name); returns it."""
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    """The registered method `name`; ValueError naming the known ones otherwise."""
    found = SCHEMES.get(name)
    if found is None:
        raise ValueError(f"quantisation scheme must be one of {tuple(SCHEMES)}, got {name!r}")
    return found


register(Int4())
register(Fp8())

_SCALED_MM: dict[tuple[str, torch.dtype], bool] = {}
_REFUSED_SHAPES: set[tuple[int, ...]] = set()


def _scaled_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._scaled_mm with row-wise scales runs on this GPU for this output dtype: tried once."""
    key = (str(device), dtype)
    if key not in _SCALED_MM:
        try:
            a = torch.ones(16, 32, device=device).to(fp8.E4M3)
            b = torch.ones(32, 16, device=device).to(fp8.E4M3).t().contiguous().t()
            out = torch._scaled_mm(a, b, scale_a=torch.ones(16, 1, device=device),
                                   scale_b=torch.ones(1, 16, device=device), out_dtype=dtype)
            _SCALED_MM[key] = bool(out[0, 0] == 32)
        except (AttributeError, RuntimeError, NotImplementedError) as err:
            log.warning("FP8 GEMM (torch._scaled_mm) does not run on %s for %s (%s); FP8 experts dequantise "
                        "to %s instead", device, dtype, err, dtype)
            _SCALED_MM[key] = False
    return _SCALED_MM[key]
