"""int4 weight-only quantisation: symmetric, one scale per group of 128 inputs, two values per byte.

Legend: N leading dims (experts), Din inputs, Dout outputs, G = ceil(Din / group) groups.

Weights are laid out [..., Din, Dout] (Herd's fused experts: gate_up_proj [E, H, 2I], down_proj [E, I, H]).
Each group of `group` consecutive inputs of one output column shares a scale s = max|w| / 7; a weight
becomes q = round(w / s) clamped to [-8, 7] (so 0 stays 0 and the range is symmetric but for -8). Two
consecutive inputs share a byte: input 2j in the low nibble, 2j+1 in the high one, each as q + 8
(0..15). Dequantised, w' = q * s: the error of one weight is at most s / 2.
"""

from __future__ import annotations

import torch

GROUP = 128
"""Inputs sharing one scale."""
QMAX = 7


def quantize_int4(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., Din, Dout] float -> (packed [..., ceil(Din/2), Dout] uint8, scales [..., G, Dout] bfloat16)."""
    if weight.dim() < 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"int4 quantises floating-point [..., in, out] weights, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if group < 2 or group % 2:
        raise ValueError(f"group must be an even number of inputs >= 2, got {group}")
    *lead, d_in, d_out = weight.shape
    groups = -(-d_in // group)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, 0, 0, groups * group - d_in))  # zero inputs: no effect on max
    grouped = padded.reshape(*lead, groups, group, d_out)
    scales = (grouped.abs().amax(dim=-2) / QMAX).to(torch.bfloat16)  # [..., G, Dout]
    safe = scales.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None, :]
    q = torch.round(grouped / safe).clamp(-QMAX - 1, QMAX).to(torch.int16)
    q = q.reshape(*lead, groups * group, d_out)[..., :d_in, :] + 8  # [..., Din, Dout] in 0..15
    if d_in % 2:
        q = torch.nn.functional.pad(q, (0, 0, 0, 1), value=8)  # a zero weight pads the last byte
    packed = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).to(torch.uint8)
    return packed, scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, d_in: int, *, group: int = GROUP,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(packed [..., ceil(Din/2), Dout], scales [..., G, Dout]) -> [..., Din, Dout] in `dtype`."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 weights are uint8, got {packed.dtype}")
    expected = -(-d_in // 2)
    if packed.shape[-2] != expected or scales.shape[-2] != -(-d_in // group) or scales.shape[-1] != packed.shape[-1]:
        raise ValueError(f"int4 tensors do not match {d_in} inputs: packed {tuple(packed.shape)}, "
                         f"scales {tuple(scales.shape)} (group {group})")
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    q = torch.stack([low, high], dim=-2).flatten(-3, -2)[..., :d_in, :]  # [..., Din, Dout] interleaved back
    groups = scales.shape[-2]
    if d_in == groups * group:  # whole groups: scale by broadcasting, no per-input copy of the scales
        grouped = q.to(dtype).reshape(*q.shape[:-2], groups, group, q.shape[-1])  # [..., G, group, Dout]
        return (grouped * scales.to(dtype).unsqueeze(-2)).flatten(-3, -2)
    per_input = scales.float().repeat_interleave(group, dim=-2)[..., :d_in, :]
    return (q.float() * per_input).to(dtype)


GEMV_MAX_ROWS = 8
"""Rows the dequantise-in-GEMM kernel (cuda/int4.cu, GEMV_MAX_ROWS there) serves; more use dequantise + cuBLAS."""
SHARED_BYTES = 48 * 1024
"""Dynamic shared memory a CUDA block gets without opting in: the kernel's slice of x must fit."""


def gemv_splits(rows: int, d_in: int, d_out: int, group: int, sms: int, *, threads: int = 128
                ) -> tuple[int, int] | None:
    """How the dequantise-in-GEMM kernel splits the inputs: (splits S, inputs per split), or None where it
    does not apply (too many rows, Dout not a multiple of 4, a slice of x too wide for shared memory).

    Enough splits to fill the GPU's `sms` twice over; few enough that the float partial sums
    (S * R * Dout * 4 bytes) stay small beside the packed weights (Din * Dout / 2); each split a whole
    number of groups, so a thread reloads its scales only at group edges.
    """
    if not 1 <= rows <= GEMV_MAX_ROWS or d_out % 4 or d_out < 1 or d_in < 1:
        return None
    groups = -(-d_in // group)
    col_blocks = -(-(d_out // 4) // threads)
    splits = min(groups, -(-2 * sms // col_blocks), max(1, d_in // (32 * rows)))
    splits = max(splits, -(-rows * d_in * 4 // SHARED_BYTES), 1)
    split_inputs = -(-groups // splits) * group
    if rows * split_inputs * 4 > SHARED_BYTES:
        return None
    return -(-d_in // split_inputs), split_inputs
