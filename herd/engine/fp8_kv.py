"""FP8 (e4m3) keys and values: what an FP8 KV cache (EngineConfig.kv_cache_dtype "fp8") stores, and back.

Legend: S tokens, K key/value heads, D head dim.

Each (token, kv head) vector gets its own float32 scale, amax / 448 (448: the largest finite e4m3 value), so its
largest element lands on the top of the e4m3 range and the rest keep e4m3's 3 mantissa bits relative to it; a zero
vector gets scale 1. The quantised values are returned as uint8 bytes: CPU torch has no index_copy_ for
float8_e4m3fn, and the cache moves bytes anyway (herd.engine.paged_kv).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
"""448: the largest finite e4m3 value."""
SCALE_DTYPE = torch.float32


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [S, K, D] (any float dtype) -> (bytes [S, K, D] uint8 holding e4m3 values, scales [S, K] float32)."""
    amax = x.abs().amax(dim=-1).to(SCALE_DTYPE)  # [S, K]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # [S, K]
    q = (x.to(SCALE_DTYPE) / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # [S, K, D]
    return q.view(torch.uint8), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bytes [S, K, D] uint8 (e4m3), scales [S, K] float32 -> values [S, K, D] in `dtype`.

    Computed in `dtype` itself (every e4m3 value is exact in bfloat16 and float16; the scale and the product round
    once each there, 2^-9 against e4m3's 2^-4), so a read gathers no float32 copy of the keys beside its result."""
    return q.view(FP8).to(dtype) * scale.to(dtype)[..., None]
