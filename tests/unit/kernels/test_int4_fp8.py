"""int4 and FP8 numerics: exact packing, bounded rounding, per-channel weight and per-token activation scales."""

from __future__ import annotations

import pytest
import torch

from herd.kernels.fp8 import E4M3, dequantize_fp8, quantize_fp8, quantize_rows
from herd.kernels.int4 import GEMV_MAX_ROWS, SHARED_BYTES, dequantize_int4, gemv_splits, quantize_int4


def test_int4_packs_grid_values_exactly():
    generator = torch.Generator().manual_seed(0)
    scales = (torch.rand(3, 2, 5, generator=generator) + 0.1).bfloat16().float()  # [E, G, Dout], 2 groups
    q = torch.randint(-7, 8, (3, 256, 5), generator=generator).float()  # |q| <= 7: -8 would set the scale
    q[:, 0::128, :] = 7  # each group's largest value is 7 * s, so the scale is found again
    weight = q * scales.repeat_interleave(128, dim=1)
    packed, found = quantize_int4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 128, 5) and found.shape == (3, 2, 5)
    assert torch.equal(dequantize_int4(packed, found, 256, dtype=torch.float32), weight)


@pytest.mark.parametrize("d_in", [128, 200, 7, 64])
def test_int4_rounding_is_within_half_a_step(d_in):
    weight = torch.randn(2, d_in, 9, generator=torch.Generator().manual_seed(d_in))
    packed, scales = quantize_int4(weight)
    back = dequantize_int4(packed, scales, d_in, dtype=torch.float32)
    step = scales.float().repeat_interleave(128, dim=1)[:, :d_in]
    assert back.shape == weight.shape
    assert ((back - weight).abs() <= 0.5 * step * 1.02 + 1e-6).all()
    with pytest.raises(ValueError, match="do not match"):
        dequantize_int4(packed, scales, d_in + 2)


def test_fp8_keeps_three_mantissa_bits_per_output_channel():
    weight = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 1, 32)
    values, scales = quantize_fp8(weight)
    assert values.dtype == E4M3 and scales.shape == (4, 1, 32)
    back = dequantize_fp8(values, scales, dtype=torch.float32)
    normal = weight.abs() > scales * 2**-6  # e4m3's normal range, per column
    assert ((back - weight).abs() <= 2**-4 * weight.abs())[normal].all()
    torch.testing.assert_close(back.abs().amax(dim=1), weight.abs().amax(dim=1), rtol=1e-6, atol=0)  # max kept


@pytest.mark.parametrize("d_in", [256, 200])
def test_int4_whole_and_partial_groups_dequantise_alike(d_in):
    weight = torch.randn(3, d_in, 16, generator=torch.Generator().manual_seed(2))
    packed, scales = quantize_int4(weight)
    per_input = scales.float().repeat_interleave(128, dim=1)[:, :d_in]
    low, high = (packed & 15).long() - 8, (packed >> 4).long() - 8
    q = torch.stack([low, high], dim=2).flatten(1, 2)[:, :d_in]
    for dtype in (torch.float32, torch.bfloat16):
        want = (q.float() * per_input).to(dtype)
        assert torch.equal(dequantize_int4(packed, scales, d_in, dtype=dtype), want)


def test_fp8_rows_get_their_own_scale():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    x[2] *= 1000.0  # one loud token must not crush the others' resolution
    values, scales = quantize_rows(x)
    assert values.dtype == E4M3 and scales.shape == (5, 1)
    torch.testing.assert_close(scales[:, 0], x.abs().amax(dim=1) / 448.0)
    back = values.float() * scales
    assert ((back - x).abs() <= 2**-4 * x.abs() + scales * 2**-9).all()
    with pytest.raises(ValueError, match="rows, features"):
        quantize_rows(torch.ones(2, 3, 4))


@pytest.mark.parametrize(("rows", "d_in", "d_out"), [(1, 5120, 16384), (8, 5120, 16384), (1, 8192, 5120),
                                                     (8, 8192, 5120), (3, 200, 64), (8, 64, 8)])
def test_the_dequantise_in_gemm_split_covers_the_inputs_in_whole_groups(rows, d_in, d_out):
    splits, split_inputs = gemv_splits(rows, d_in, d_out, 128, sms=132)
    assert split_inputs % 128 == 0 and (splits - 1) * split_inputs < d_in <= splits * split_inputs
    assert rows * split_inputs * 4 <= SHARED_BYTES  # the slice of x fits shared memory
    if d_in >= 4096:  # a real layer: the GPU is filled, and the partial sums stay small beside the weights
        col_blocks = -(-(d_out // 4) // 128)
        assert splits * col_blocks >= 132 or splits == -(-d_in // 128)
        assert splits * rows * d_out * 4 <= 0.5 * d_in * d_out / 2


def test_the_dequantise_in_gemm_refuses_what_it_cannot_do():
    assert gemv_splits(GEMV_MAX_ROWS + 1, 5120, 16384, 128, sms=132) is None  # dequantise + cuBLAS instead
    assert gemv_splits(1, 5120, 16382, 128, sms=132) is None  # four columns a thread
    # Dout = 0: no column blocks to spread splits over (it divided by zero); the caller's fallback returns [R, 0].
    assert gemv_splits(1, 5120, 0, 128, sms=132) is None
