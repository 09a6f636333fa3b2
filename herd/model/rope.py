"""Rotary position embeddings, Llama 4 style: interleaved pairs rotated as complex numbers.

Legend: T tokens, N heads, D head dim. Channels (2i, 2i+1) of a head form one complex number that
turns by position * inv_freq[i]. Llama 3.1 scaling stretches the low frequencies for long context.
"""

from __future__ import annotations

import math

import torch

from herd.model.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair angular frequencies [D/2], float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "default":
        return inv_freq
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, and the band between is blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rotations(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations [T, D/2] for integer positions [T]."""
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, D/2]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, N, D] by rot [T, D/2]; computed in float32, returned in x's dtype."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [T, N, D/2]
    return torch.view_as_real(pairs * rot[:, None, :]).flatten(-2).type_as(x)
