"""FP8 (e4m3) weight quantisation with one scale per output channel, as the published FP8 checkpoints store it.

Legend: Din inputs, Dout outputs. Weights are [..., Din, Dout] (the right operand of x @ W); the scale of
output column j is s_j = max_i |w_ij| / 448 (e4m3's largest finite value), so w_ij / s_j fits e4m3 without
overflow. Dequantised, w' = fp8(w / s) * s: e4m3 keeps 3 mantissa bits, a relative error of at most 2^-4
for normal values.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., Din, Dout] float -> (e4m3 [..., Din, Dout], float32 scales [..., 1, Dout])."""
    if weight.dim() < 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"FP8 quantises floating-point [..., in, out] weights, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    w = weight.float()
    scales = (w.abs().amax(dim=-2, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scales).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scales


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(e4m3 [..., Din, Dout], scales broadcastable to it) -> [..., Din, Dout] in `dtype`."""
    if values.dtype != E4M3:
        raise ValueError(f"FP8 weights are {E4M3}, got {values.dtype}")
    return (values.float() * scales.float()).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation scaling: [R, D] float -> (e4m3 [R, D], float32 scales [R, 1]).

    Each row (token) gets s = max|x| / 448, computed on the fly, as the FP8 checkpoints' input
    activations ask ("dynamic", "token" strategy).
    """
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"FP8 activation scaling takes floating-point [rows, features], got {x.dtype} "
                         f"{tuple(x.shape)}")
    rows = x.float()
    scales = (rows.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (rows / scales).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scales
