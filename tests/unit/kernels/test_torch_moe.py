"""The four torch MoE stages against the plain reference, and the reference against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from herd import kernels


def _weights(generator, experts, hidden, inter):
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=generator) * hidden**-0.5
    down = torch.randn(experts, inter, hidden, generator=generator) * inter**-0.5
    return gate_up, down


def _experts_call(offsets, hidden=4):
    gate_up, down = torch.zeros(2, 4, 6), torch.zeros(2, 3, 4)
    return lambda: kernels.experts(torch.zeros(2, hidden), torch.tensor(offsets), gate_up, down)


def _staged(x, logits, k, gate_up, down):
    ids, scores = kernels.route(logits, k)
    rows, permutation = kernels.permute(x, ids, scores, gate_up.shape[0])
    out_rows = kernels.experts(rows, permutation.expert_offsets, gate_up, down)
    return kernels.combine(out_rows, permutation, x.shape[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("tokens", "experts", "k"), [(37, 4, 1), (5, 16, 1), (64, 8, 2), (3, 6, 4), (1, 128, 1)])
def test_four_stages_equal_the_reference(seed, tokens, experts, k):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=generator)
    logits = torch.randn(tokens, experts, generator=generator)
    gate_up, down = _weights(generator, experts, 32, 24)
    expected = kernels.moe_reference(x, logits, k, gate_up, down)
    got = _staged(x, logits, k, gate_up, down)
    assert ((got - expected).norm() / expected.norm()) < 1e-6


def test_reference_equals_transformers_moe_on_filled_weights():
    config = Llama4TextConfig(hidden_size=32, intermediate_size=24, num_local_experts=8, num_experts_per_tok=1)
    torch.manual_seed(0)
    moe = Llama4TextMoe(config).eval()
    with torch.no_grad():  # a bare module starts with all-zero gate_up_proj: fill it, or nothing is compared
        moe.experts.gate_up_proj.normal_(0, 0.2)
        moe.experts.down_proj.normal_(0, 0.2)
    x = torch.randn(50, 32)
    with torch.no_grad():
        expected, logits = moe(x)
        shared = moe.shared_expert(x)
    ours = shared + kernels.moe_reference(x, logits, 1, moe.experts.gate_up_proj, moe.experts.down_proj)
    assert (expected - shared).norm() > 0.1 * expected.norm(), "routed experts must contribute"
    assert ((ours - expected).norm() / expected.norm()) < 1e-6


def test_permute_groups_rows_by_expert_scaled_by_score():
    x = torch.arange(12.0).reshape(4, 3)
    ids = torch.tensor([[2, 0], [0, 1], [2, 2], [1, 0]], dtype=torch.int32)
    scores = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 0.5], [1.0, 1.0]])
    rows, permutation = kernels.permute(x, ids, scores, num_experts=4)
    assert permutation.expert_offsets.tolist() == [0, 3, 5, 8, 8]  # expert 3 has no rows
    assert permutation.row_token.tolist() == [0, 1, 3, 1, 3, 0, 2, 2]  # token order kept within an expert
    torch.testing.assert_close(rows[0], x[0] * 0.25)
    torch.testing.assert_close(rows[6], x[2] * 3.0)
    # With identity experts, combine(permute(x)) is x times the sum of its scores.
    torch.testing.assert_close(kernels.combine(rows, permutation, 4), x * scores.sum(1, keepdim=True))


def test_route_takes_top_k_of_raw_logits_then_sigmoid():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, -2.0, 2.5]])
    ids, scores = kernels.route(logits, 2)
    assert ids.dtype == torch.int32 and ids.tolist() == [[1, 0], [0, 2]]
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([[2.0, 0.1], [3.0, 2.5]])))


def test_experts_with_no_rows_are_never_touched():
    gate_up = torch.full((3, 4, 6), float("nan"))
    down = torch.full((3, 3, 4), float("nan"))
    gate_up[1], down[1] = 0.1, 0.1
    rows = torch.ones(2, 4)
    out = kernels.experts(rows, torch.tensor([0, 0, 2, 2]), gate_up, down)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kernels.route(torch.zeros(3, 4), 5), "k must be in 1..4"),
        (lambda: kernels.route(torch.zeros(3), 1), r"\[T, E\]"),
        (lambda: kernels.permute(torch.zeros(2, 4), torch.tensor([[0], [9]]), torch.ones(2, 1), 4), "0..3"),
        (lambda: kernels.permute(torch.zeros(2, 4), torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1), 4), "k]"),
        (_experts_call([0, 2]), r"expert_offsets must be \[3\]"),
        (_experts_call([0, 1, 3]), "0 to 2 rows"),
        (_experts_call([0, 1, 2], hidden=5), r"rows must be \[R, 4\]"),
    ],
)
def test_bad_shapes_raise_value_error_with_the_values(call, message):
    with pytest.raises(ValueError, match=message):
        call()
