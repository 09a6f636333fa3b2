"""Each MoE stage, and the four together, against the plain reference on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd import kernels
from tests.unit.kernels.moe_inputs import DEVICES, TOLERANCE, make_inputs, rel_error

# (tokens, experts, k): T=1, T prime, k > 1, more experts than rows (many experts get none), E=128.
SHAPES = [(1, 16, 1), (37, 16, 2), (5, 16, 1), (64, 8, 2), (3, 6, 4), (97, 128, 1), (200, 128, 2)]
DTYPES = [torch.float32, torch.bfloat16]


def _reference_inputs(inputs):
    """The reference runs in float32 on the same (possibly bf16-rounded) values."""
    return (inputs.x.float(), inputs.logits.float(), inputs.k, inputs.gate_up.float(), inputs.down.float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "k"), SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_four_stages_equal_the_reference(device, dtype, tokens, experts, k, seed):
    inputs = make_inputs(seed, tokens, experts, k, dtype=dtype, device=device)
    ids, scores = kernels.route(inputs.logits, k)
    rows, permutation = kernels.permute(inputs.x, ids, scores, experts)
    out_rows = kernels.experts(rows, permutation.expert_offsets, inputs.gate_up, inputs.down)
    got = kernels.combine(out_rows, permutation, tokens)
    assert got.dtype == dtype and got.shape == inputs.x.shape
    expected = kernels.moe_reference(*_reference_inputs(inputs))
    assert rel_error(got, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "k"), SHAPES)
def test_route_is_top_k_of_raw_logits_then_sigmoid(device, dtype, tokens, experts, k):
    inputs = make_inputs(0, tokens, experts, k, dtype=dtype, device=device)
    ids, scores = kernels.route(inputs.logits, k)
    top, expected_ids = torch.topk(inputs.logits.float(), k, dim=1)
    assert ids.dtype == torch.int32 and scores.dtype == dtype
    assert torch.equal(ids.long(), expected_ids)
    assert rel_error(scores, torch.sigmoid(top)) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "k"), SHAPES)
def test_permute_groups_rows_stably_in_the_given_expert_order(device, dtype, tokens, experts, k):
    inputs = make_inputs(1, tokens, experts, k, dtype=dtype, device=device)
    ids, scores = kernels.route(inputs.logits, k)
    order = torch.randperm(experts, generator=torch.Generator().manual_seed(tokens)).tolist()
    rows, p = kernels.permute(inputs.x, ids, scores, experts, expert_order=order)
    offsets, source = p.expert_offsets.cpu().tolist(), p.row_source.cpu().long()
    flat_ids, flat_scores = ids.cpu().reshape(-1).long(), scores.cpu().reshape(-1)
    assert p.group_experts.cpu().tolist() == order
    for group, expert in enumerate(order):
        sources = source[offsets[group] : offsets[group + 1]]
        expected_sources = (flat_ids == expert).nonzero().flatten()  # every row of this expert, in token order
        assert sources.tolist() == expected_sources.tolist()
    assert torch.equal(p.source_row.cpu().long()[source], torch.arange(tokens * k))
    expected_rows = inputs.x.cpu().float()[source // k] * flat_scores[source].float()[:, None]
    assert rel_error(rows, expected_rows) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_compute_each_rows_own_expert_and_skip_empty_ones(device, dtype):
    inputs = make_inputs(2, 1, 1, 1, dtype=dtype, device=device)  # only for shapes and dtype
    g = torch.Generator().manual_seed(3)
    counts = [3, 0, 5, 0, 0, 1]  # empty experts, first and last included
    gate_up = (torch.randn(6, 32, 48, generator=g) * 0.2).to(device, dtype)
    down = (torch.randn(6, 24, 32, generator=g) * 0.2).to(device, dtype)
    gate_up[[1, 3, 4]] = float("nan")  # never read: a NaN here would poison the output
    rows = torch.randn(sum(counts), 32, generator=g).to(device, dtype)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device=device)
    out = kernels.experts(rows, offsets, gate_up, down)
    owner = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))
    expected = torch.stack([
        _swiglu(rows[i].float(), gate_up[e].float(), down[e].float()) for i, e in enumerate(owner.tolist())
    ])
    assert out.dtype == inputs.x.dtype and torch.isfinite(out).all()
    assert rel_error(out, expected) < TOLERANCE[dtype]


def _swiglu(row, gate_up, down):
    gate, up = (row @ gate_up).chunk(2)
    return (F.silu(gate) * up) @ down


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_combine_sums_each_tokens_k_rows(device, dtype, k):
    inputs = make_inputs(4, 11, 8, k, dtype=dtype, device=device)
    ids, scores = kernels.route(inputs.logits, k)
    rows, p = kernels.permute(inputs.x, ids, scores, 8)
    # With identity experts, combine(permute(x)) is x times the sum of its k scores.
    got = kernels.combine(rows, p, 11)
    expected = inputs.x.float() * scores.float().sum(1, keepdim=True)
    assert rel_error(got, expected) < TOLERANCE[dtype]


def test_reference_equals_transformers_moe_on_filled_weights():
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

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
    assert rel_error(ours, expected) < 1e-6


def test_swiglu_works_in_place_without_autograd_and_out_of_place_with_it():
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    expected = F.silu(gate) * up
    with torch.inference_mode():
        owned = gate.clone()
        assert kernels.swiglu(owned, up) is owned
        torch.testing.assert_close(owned, expected)
    leaf = gate.clone().requires_grad_()
    out = kernels.swiglu(leaf, up)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    torch.testing.assert_close(leaf, gate, msg="the autograd input must stay untouched")
    assert leaf.grad is not None
