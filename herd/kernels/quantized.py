"""Weights kept quantised (int4 or FP8), and matmuls with them: x [R, Din] @ W [Din, Dout] -> [R, Dout].

Legend: Din inputs, Dout outputs, G = ceil(Din / group) int4 groups, R rows, E experts.

A `QuantizedTensor` is logically [..., Din, Dout], the right operand of x @ W (Herd's fused experts are
[E, H, 2I] and [E, I, H]; an nn.Linear weight [out, in] is its transpose):
- int4 (weight-only, W4A16): values uint8 [..., ceil(Din/2), Dout] packed as herd.kernels.int4 says,
  scales bfloat16 [..., G, Dout]. Activations stay in their float dtype; the weight is dequantised to it.
- fp8 (W8A8): values e4m3 [..., Din, Dout], scales float32 [..., 1, Dout]; each row of x is scaled to
  e4m3 on the fly (dynamic per-token scaling, herd.kernels.fp8.quantize_rows). `values` is normally the
  transposed view of an output-major [..., Dout, Din] tensor: column-major, as FP8 GEMMs want it.

Execution: on a GPU with FP8 support (sm_89+), FP8 runs torch._scaled_mm with the row and column scales.
int4 with CuPy present runs cuda/int4.cu: up to 8 rows an expert (decode) dequantise inside the GEMM,
reading each packed byte once; more rows dequantise one expert at a time into a workspace and run cuBLAS.
On the CPU, and wherever those are missing, both dequantise and matmul in the activations' dtype (float32
inside for FP8's emulated activation rounding): the same numbers, slower.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from herd.kernels import fp8, int4

log = logging.getLogger(__name__)

SCHEMES = ("int4", "fp8")


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight [..., Din, Dout] stored quantised: `values` and `scales` as the module docstring says."""

    scheme: str
    values: torch.Tensor
    scales: torch.Tensor
    d_in: int
    group: int = int4.GROUP

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantisation scheme must be one of {SCHEMES}, got {self.scheme!r}")
        lead, d_out = tuple(self.values.shape[:-2]), self.values.shape[-1]
        if self.scheme == "int4":
            want = (self.values.dtype == torch.uint8 and self.values.shape[-2] == -(-self.d_in // 2)
                    and tuple(self.scales.shape) == (*lead, -(-self.d_in // self.group), d_out))
        else:
            want = (self.values.dtype == fp8.E4M3 and self.values.shape[-2] == self.d_in
                    and tuple(self.scales.shape) == (*lead, 1, d_out))
        if not want or self.values.device != self.scales.device:
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
        """The weight as floats [..., Din, Dout] in `dtype`."""
        if self.scheme == "int4":
            if self.values.is_cuda and self.values.dim() == 2:
                return _cuda_int4().dequantize(self, dtype)
            return int4.dequantize_int4(self.values, self.scales, self.d_in, group=self.group, dtype=dtype)
        return fp8.dequantize_fp8(self.values, self.scales, dtype=dtype)

    def to(self, device: str | torch.device) -> QuantizedTensor:
        return QuantizedTensor(self.scheme, self.values.to(device), self.scales.to(device), self.d_in, self.group)


def quantize(weight: torch.Tensor, scheme: str) -> QuantizedTensor:
    """Quantise a float weight [..., Din, Dout]; FP8 values come out as an output-major tensor's view."""
    if scheme == "int4":
        packed, scales = int4.quantize_int4(weight)
        return QuantizedTensor("int4", packed, scales, weight.shape[-2])
    if scheme == "fp8":
        values, scales = fp8.quantize_fp8(weight)
        return QuantizedTensor("fp8", values.transpose(-1, -2).contiguous().transpose(-1, -2), scales, weight.shape[-2])
    raise ValueError(f"quantisation scheme must be one of {SCHEMES}, got {scheme!r}")


def matmul(x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
    """x [R, Din] @ weight [Din, Dout] -> [R, Dout] in x's dtype."""
    if weight.values.dim() != 2 or x.dim() != 2 or x.shape[1] != weight.d_in:
        raise ValueError(f"x {tuple(x.shape)} cannot multiply a {weight.scheme} weight of shape {weight.shape}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, the {weight.scheme} weight on {weight.device}")
    if weight.scheme == "fp8":
        values, scales = fp8.quantize_rows(x)  # per-token e4m3, on every device
        if x.is_cuda and _scaled_mm_works(x.device, x.dtype):
            try:
                return torch._scaled_mm(values, weight.values, scale_a=scales, scale_b=weight.scales.float(),
                                        out_dtype=x.dtype)
            except RuntimeError as err:  # a shape this GEMM refuses (sizes not multiples of 16): emulate below
                if weight.shape not in _REFUSED_SHAPES:
                    _REFUSED_SHAPES.add(weight.shape)
                    log.warning("torch._scaled_mm refused x %s @ %s (%s); this shape runs emulated FP8 (dequantised)",
                                tuple(x.shape), weight.shape, err)
        product = (values.float() * scales) @ weight.dequantize(torch.float32)  # the GPU's numbers, in float32
        return product.to(x.dtype)
    if x.is_cuda:
        fused = getattr(_cuda_int4(), "int4_matmul", None)  # dequantise-in-GEMM for a few rows (CuPy)
        out = fused(x, weight) if fused is not None else None
        if out is not None:
            return out
    return x @ weight.dequantize(x.dtype)


def experts(
    rows: torch.Tensor, expert_offsets: torch.Tensor, gate_up: QuantizedTensor, down: QuantizedTensor
) -> torch.Tensor:
    """SwiGLU per expert over its slice of rows, weights quantised: rows [R, H] -> [R, H].

    gate_up [E', H, 2I] and down [E', I, H]; experts with no rows are not touched (nor dequantised).
    """
    from herd.kernels.torch_moe import swiglu

    inter = down.d_in
    out = torch.empty_like(rows)
    bounds = expert_offsets.tolist()
    for e in range(gate_up.shape[0]):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            gate_up_out = matmul(rows[start:end], gate_up[e])  # [n, 2I]
            out[start:end] = matmul(swiglu(gate_up_out[:, :inter], gate_up_out[:, inter:]), down[e])
    return out


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


def _cuda_int4():  # the CuPy dequantise kernel, or torch on the GPU where CuPy is missing
    global _INT4_BACKEND
    if _INT4_BACKEND is None:
        try:
            from herd.kernels import cupy_moe as backend
        except ImportError as err:
            log.warning("CuPy is not importable (%s); int4 weights dequantise with torch on the GPU", err)
            backend = _TorchInt4()
        _INT4_BACKEND = backend
    return _INT4_BACKEND


class _TorchInt4:
    @staticmethod
    def dequantize(weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return int4.dequantize_int4(weight.values, weight.scales, weight.d_in, group=weight.group, dtype=dtype)


_INT4_BACKEND = None
