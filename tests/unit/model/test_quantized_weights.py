"""int4 and FP8 weight formats: exact packing, bounded rounding, and what they cost the tiny models' logits.

The accuracy check quantises every feed-forward weight of the tiny checkpoints (routed experts, shared
expert, dense MLPs: the formats' scope, see herd/platform/capacity/weights.py), dequantises it back and
compares the model's next-token distributions with the float32 model on a fixed prompt set: mean KL
divergence and top-1 agreement over every position. The tiny models' weights are random and dense in
outliers-free Gaussians, a harder case per weight than trained ones only in that nothing is redundant.
"""

from __future__ import annotations

import pytest
import torch

from herd.kernels.fp8 import E4M3, dequantize_fp8, quantize_fp8
from herd.kernels.int4 import dequantize_int4, quantize_int4
from herd.model import load_model
from herd.model.moe import MoE
from herd.model.tiny import make_tiny

# Thresholds: measured 2026-12-02 on these models (scout seed 0 / maverick seed 1): int4 mean KL 0.036 / 0.035,
# top-1 0.63 / 0.61; FP8 KL 0.0044 / 0.0058, top-1 0.88 / 0.91; asserted with a margin. The tiny models'
# random weights give flat next-token distributions with many near ties, so top-1 moves more than on a
# trained model; a nibble-order bug (the control below) moves KL past 0.3.
INT4_MAX_KL, INT4_MIN_TOP1 = 0.06, 0.50
FP8_MAX_KL, FP8_MIN_TOP1 = 0.01, 0.80


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


def _round_trip(weight: torch.Tensor, fmt: str, *, linear: bool) -> torch.Tensor:
    """Quantise and dequantise; nn.Linear weights are [out, in], so they go through [in, out]."""
    w = weight.detach().t() if linear else weight.detach()
    if fmt in ("int4", "int4-nibbles-swapped"):
        packed, scales = quantize_int4(w)
        if fmt == "int4-nibbles-swapped":
            packed = (packed >> 4) | (packed << 4)
        back = dequantize_int4(packed, scales, w.shape[-2], dtype=torch.float32)
    else:
        back = dequantize_fp8(*quantize_fp8(w), dtype=torch.float32)
    return back.t().contiguous() if linear else back


@torch.no_grad()
def _quantise_feed_forward(model, fmt: str) -> None:
    for layer in model.model.layers:
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(ff.experts, name)
                param.copy_(_round_trip(param, fmt, linear=False))
            linears = [ff.shared_expert.gate_proj, ff.shared_expert.up_proj, ff.shared_expert.down_proj]
        else:
            linears = [ff.gate_proj, ff.up_proj, ff.down_proj]
        for linear in linears:
            linear.weight.copy_(_round_trip(linear.weight, fmt, linear=True))


def _prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 400, (40,), generator=generator) for _ in range(6)]


@pytest.fixture(scope="module", params=[("scout", 0), ("maverick", 1)], ids=["scout", "maverick"])
def checkpoint(request, tmp_path_factory):
    preset, seed = request.param
    return make_tiny(tmp_path_factory.mktemp(preset), preset=preset, seed=seed)


def _agreement(path, fmt: str) -> tuple[float, float]:
    reference = load_model(path, progress=False)
    quantised = load_model(path, progress=False)
    _quantise_feed_forward(quantised, fmt)
    kls, agree, total = [], 0, 0
    for ids in _prompts():
        ref = torch.log_softmax(reference.logits(ids), dim=-1)
        out = torch.log_softmax(quantised.logits(ids), dim=-1)
        kls.append((ref.exp() * (ref - out)).sum(-1))
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        total += ids.numel()
    return float(torch.cat(kls).mean()), agree / total


@pytest.mark.parametrize(("fmt", "max_kl", "min_top1"),
                         [("int4", INT4_MAX_KL, INT4_MIN_TOP1), ("fp8", FP8_MAX_KL, FP8_MIN_TOP1)])
def test_quantised_logits_stay_close_to_the_float_model(checkpoint, fmt, max_kl, min_top1):
    kl, top1 = _agreement(checkpoint, fmt)
    print(f"{checkpoint.name} {fmt}: mean KL {kl:.5f}, top-1 agreement {top1:.3f}")
    assert kl < max_kl and top1 >= min_top1, f"{fmt}: KL {kl:.5f}, top-1 {top1:.3f}"
    assert kl > 0, "the comparison must see the quantisation at all"


def test_the_accuracy_check_sees_a_packing_bug(checkpoint):
    kl, _ = _agreement(checkpoint, "int4-nibbles-swapped")
    assert kl > 5 * INT4_MAX_KL, f"KL {kl:.4f}"
