"""int4 and FP8 checkpoints, as `herd quantize` writes and Herd loads them, against the float32 model.

Each tiny checkpoint is converted (every feed-forward weight: routed experts, shared expert, dense MLPs),
loaded through the quantised modules, and run on a fixed prompt set; the next-token distributions are
compared with the float32 model's: mean KL divergence and top-1 agreement over every position. FP8
includes its dynamic per-token activation scaling. The tiny models' random weights give flat next-token
distributions with many near ties, so top-1 moves more than it would on a trained model.
"""

from __future__ import annotations

import pytest
import torch

from herd.model import load_model
from herd.model.moe import Experts
from herd.model.quant.convert import quantize_checkpoint
from herd.model.tiny import make_tiny

# Thresholds, asserted with a margin over what was measured (docs/CAPACITY.md has the numbers); a
# nibble-order bug (the control below) moves KL past 5x the int4 threshold.
INT4_MAX_KL, INT4_MIN_TOP1 = 0.06, 0.50
FP8_MAX_KL, FP8_MIN_TOP1 = 0.015, 0.75


def _prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 400, (40,), generator=generator) for _ in range(6)]


@pytest.fixture(scope="module", params=[("scout", 0), ("maverick", 1)], ids=["scout", "maverick"])
def checkpoints(request, tmp_path_factory):
    preset, seed = request.param
    root = tmp_path_factory.mktemp(preset)
    source = make_tiny(root / "float", preset=preset, seed=seed)
    return {"float": source, **{s: quantize_checkpoint(source, root / s, s, progress=False) for s in ("int4", "fp8")}}


def _agreement(reference, quantised) -> tuple[float, float]:
    kls, agree, total = [], 0, 0
    for ids in _prompts():
        ref = torch.log_softmax(reference.logits(ids), dim=-1)
        out = torch.log_softmax(quantised.logits(ids), dim=-1)
        kls.append((ref.exp() * (ref - out)).sum(-1))
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        total += ids.numel()
    return float(torch.cat(kls).mean()), agree / total


@pytest.mark.parametrize(("scheme", "max_kl", "min_top1"),
                         [("int4", INT4_MAX_KL, INT4_MIN_TOP1), ("fp8", FP8_MAX_KL, FP8_MIN_TOP1)])
def test_quantised_checkpoints_stay_close_to_the_float_model(checkpoints, scheme, max_kl, min_top1):
    reference = load_model(checkpoints["float"], progress=False)
    quantised = load_model(checkpoints[scheme], progress=False)
    assert any(isinstance(m, Experts) and m.scheme == scheme for m in quantised.modules())
    kl, top1 = _agreement(reference, quantised)
    print(f"{checkpoints['float'].parent.name} {scheme}: mean KL {kl:.5f}, top-1 agreement {top1:.3f}")
    assert kl < max_kl and top1 >= min_top1, f"{scheme}: KL {kl:.5f}, top-1 {top1:.3f}"
    assert kl > 0, "the comparison must see the quantisation at all"


@torch.no_grad()
def test_the_accuracy_check_sees_a_packing_bug(checkpoints):
    reference = load_model(checkpoints["float"], progress=False)
    broken = load_model(checkpoints["int4"], progress=False)
    for name, buf in broken.named_buffers():
        if name.endswith("_packed"):
            buf.copy_((buf >> 4) | (buf << 4))  # nibbles swapped: the two inputs of each byte trade places
    kl, _ = _agreement(reference, broken)
    assert kl > 5 * INT4_MAX_KL, f"KL {kl:.4f}"
