"""Random MoE inputs for the kernel tests: fresh per seed, tie-free router logits in every dtype."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@dataclass
class MoEInputs:
    x: torch.Tensor  # [T, H]
    logits: torch.Tensor  # [T, E]
    gate_up: torch.Tensor  # [E, H, 2I]
    down: torch.Tensor  # [E, I, H]
    k: int


def distinct_logits(tokens: int, experts: int, generator: torch.Generator) -> torch.Tensor:
    """Each row a shuffle of distinct values that bfloat16 holds exactly, so top-k has no ties."""
    ranks = torch.argsort(torch.rand(tokens, experts, generator=generator), dim=1).float()  # [T, E]
    return (ranks - experts / 2) / 16


def make_inputs(
    seed: int, tokens: int, experts: int, k: int, *, hidden: int = 32, inter: int = 24,
    dtype: torch.dtype = torch.float32, device: str = "cpu",
) -> MoEInputs:
    g = torch.Generator().manual_seed(seed)
    return MoEInputs(
        x=torch.randn(tokens, hidden, generator=g).to(device, dtype),
        logits=distinct_logits(tokens, experts, g).to(device, dtype),
        gate_up=(torch.randn(experts, hidden, 2 * inter, generator=g) * hidden**-0.5).to(device, dtype),
        down=(torch.randn(experts, inter, hidden, generator=g) * inter**-0.5).to(device, dtype),
        k=k,
    )


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return float((got.float() - expected).norm() / expected.norm().clamp_min(1e-30))
