"""Per-row LoRA deltas (herd.kernels.lora) and experts with them, against plain references on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd import kernels
from herd.kernels import torch_moe
from herd.kernels.lora import (
    ExpertsLoRA,
    LoRAStack,
    lora_delta,
    lora_delta_grouped,
    lora_delta_masked,
    lora_reference,
)

TOLERANCE = 1e-5


def _stack(generator, entries, rank, d_in, d_out, *, zero_first=True):
    a = torch.randn(entries, rank, d_in, generator=generator)
    b = torch.randn(entries, d_out, rank, generator=generator)
    scaling = torch.rand(entries, generator=generator) + 0.5
    if zero_first:  # entry 0 is the base model's, as in herd.model.lora_bank
        a[0], b[0], scaling[0] = 0, 0, 0
    return LoRAStack(a=a, b=b, scaling=scaling)


def _rel(x, y):
    return ((x - y).norm() / y.norm()).item()


@pytest.mark.parametrize(("rows", "entries", "rank"), [(1, 2, 1), (7, 4, 8), (33, 9, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gathered_grouped_and_masked_deltas_equal_each_rows_own_adapter(rows, entries, rank, seed):
    generator = torch.Generator().manual_seed(seed)
    stack = _stack(generator, entries, rank, 24, 40)
    x = torch.randn(rows, 24, generator=generator)
    index = torch.randint(0, entries, (rows,), generator=generator)
    want = torch.stack([lora_reference(x[t : t + 1], stack.a[i], stack.b[i], float(stack.scaling[i]))[0]
                        for t, i in enumerate(index.tolist())])
    for delta in (lora_delta, lora_delta_grouped, lora_delta_masked):
        got = delta(x, stack, index)
        assert got.shape == (rows, 40)
        assert _rel(got, want) < TOLERANCE if want.norm() > 0 else torch.equal(got, want)
        assert torch.equal(got[index == 0], torch.zeros_like(got[index == 0])), "the base entry adds exactly zero"


def test_a_wrong_entry_is_detected():
    """Control: gathering a neighbour's adapter is far from the reference."""
    generator = torch.Generator().manual_seed(0)
    stack = _stack(generator, 3, 4, 16, 16, zero_first=False)
    x = torch.randn(5, 16, generator=generator)
    want = lora_reference(x, stack.a[1], stack.b[1], float(stack.scaling[1]))
    for delta in (lora_delta, lora_delta_grouped, lora_delta_masked):
        assert _rel(delta(x, stack, torch.full((5,), 2)), want) > 0.1


def _experts_reference(rows, row_experts, row_entries, gate_up, down, lora_gu, lora_down):
    """Row by row: SwiGLU of the row's expert with its own adapter deltas, the plain way."""
    inter = down.shape[1]
    out = []
    for x, e, i in zip(rows, row_experts.tolist(), row_entries.tolist(), strict=True):
        x = x[None]
        h = x @ gate_up[e] + lora_reference(x, lora_gu.a[i], lora_gu.b[i], float(lora_gu.scaling[i]))
        act = F.silu(h[:, :inter]) * h[:, inter:]
        out.append(act @ down[e] + lora_reference(act, lora_down.a[i], lora_down.b[i], float(lora_down.scaling[i])))
    return torch.cat(out)


@pytest.mark.parametrize("path", ["api", "looped"])
@pytest.mark.parametrize("seed", [0, 1])
def test_experts_with_lora_equal_a_plain_per_expert_reference(path, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens, experts, k, hidden, inter, slots, rank = 19, 6, 2, 32, 16, 3, 4
    x = torch.randn(tokens, hidden, generator=generator)
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=generator) * hidden**-0.5
    down = torch.randn(experts, inter, hidden, generator=generator) * inter**-0.5
    ids, scores = kernels.route(torch.randn(tokens, experts, generator=generator), k)
    rows, permutation = kernels.permute(x, ids, scores, experts)
    row_tokens = permutation.row_source // k
    row_experts = ids.reshape(-1)[permutation.row_source].long()
    token_entries = torch.randint(0, slots + 1, (tokens,), generator=generator)  # 0: base
    row_index = token_entries[row_tokens] * experts + row_experts
    lora = ExpertsLoRA(gate_up=_stack(generator, (slots + 1) * experts, rank, hidden, 2 * inter),
                       down=_stack(generator, (slots + 1) * experts, rank, inter, hidden), row_index=row_index)
    lora.gate_up.a[:experts], lora.down.a[:experts] = 0, 0  # the base slot's E entries
    if path == "api":
        got = kernels.experts(rows, permutation.expert_offsets, gate_up, down, lora=lora)
    else:
        got = torch_moe._looped_experts(rows, permutation.expert_offsets, gate_up, down, lora)
    want = _experts_reference(rows, row_experts, row_index, gate_up, down, lora.gate_up, lora.down)
    assert _rel(got, want) < TOLERANCE
    plain = kernels.experts(rows, permutation.expert_offsets, gate_up, down)
    base = row_index < experts
    assert torch.equal(got[base], plain[base]), "base rows must equal the experts without LoRA"
    assert _rel(got[~base], plain[~base]) > 0.1, "the adapters must matter"


def test_experts_refuse_a_lora_that_does_not_fit():
    rows, offsets = torch.randn(4, 8), torch.tensor([0, 2, 4])
    gate_up, down = torch.randn(2, 8, 12), torch.randn(2, 6, 8)
    wrong = LoRAStack(a=torch.zeros(4, 2, 6), b=torch.zeros(4, 12, 2), scaling=torch.zeros(4))  # Din 6, not 8
    with pytest.raises(ValueError, match=r"lora\.gate_up\.a must be"):
        kernels.experts(rows, offsets, gate_up, down, lora=ExpertsLoRA(wrong, None, torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(ValueError, match="row_index must be"):
        kernels.experts(rows, offsets, gate_up, down, lora=ExpertsLoRA(None, None, torch.zeros(3, dtype=torch.int64)))
