"""Bad input to any stage: a ValueError naming the tensor and the values, before any work."""

from __future__ import annotations

import pytest
import torch

from herd import kernels

X = torch.zeros(4, 8)
IDS = torch.zeros(4, 1, dtype=torch.int32)
SCORES = torch.ones(4, 1)
GATE_UP, DOWN = torch.zeros(2, 8, 6), torch.zeros(2, 3, 8)


def _permuted():
    return kernels.permute(X, IDS, SCORES, 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kernels.route(torch.zeros(3, 4), 5), r"k must be an integer in 1\.\.4 \(experts\), got 5"),
        (lambda: kernels.route(torch.zeros(3, 4), 0), "got 0"),
        (lambda: kernels.route(torch.zeros(3), 1), r"router_logits must have 2 dimensions, got shape \(3,\)"),
        (lambda: kernels.route(torch.zeros(3, 4).half(), 1), "router_logits must be .* got torch.float16"),
        (lambda: kernels.route(torch.zeros(4, 3).t(), 1), r"router_logits must be contiguous, got strides \(1, 3\)"),
        (lambda: kernels.route(torch.zeros(3, 2000), 1), "2000 experts"),
        (lambda: kernels.permute(X, torch.tensor([[0], [9], [1], [1]], dtype=torch.int32), SCORES, 4),
         r"topk_ids hold experts 0\.\.9, outside 0\.\.3"),
        (lambda: kernels.permute(X, torch.tensor([[0], [-1], [1], [1]], dtype=torch.int32), SCORES, 4), "-1"),
        (lambda: kernels.permute(X, IDS.long(), SCORES, 4), "topk_ids must be torch.int32, got torch.int64"),
        (lambda: kernels.permute(X, IDS, SCORES.bfloat16(), 4), "topk_scores must be torch.float32"),
        (lambda: kernels.permute(X, IDS[:3], SCORES[:3], 4), r"must both be \[4, k\]"),
        (lambda: kernels.permute(X, IDS, SCORES, 2, expert_order=[1, 1]), "each of the 2 experts once"),
        (lambda: kernels.permute(X[:, ::2], IDS, SCORES, 2), "x must be contiguous"),
        (lambda: kernels.experts(X, torch.tensor([0, 2]), GATE_UP, DOWN), r"expert_offsets must be \[3\]"),
        (lambda: kernels.experts(X, torch.tensor([0, 1, 3]), GATE_UP, DOWN), r"rise from 0 to 4 rows, got \[0, 1, 3\]"),
        (lambda: kernels.experts(X, torch.tensor([0, 3, 1]), GATE_UP, DOWN), "rise from 0"),
        (lambda: kernels.experts(torch.zeros(4, 5), torch.tensor([0, 1, 4]), GATE_UP, DOWN), r"rows must be \[R, 8\]"),
        (lambda: kernels.experts(X, torch.tensor([0, 1, 4]), GATE_UP, torch.zeros(2, 4, 8)), "do not fit together"),
        (lambda: kernels.experts(X, torch.tensor([0, 1, 4]), GATE_UP.bfloat16(), DOWN), "gate_up must be .*float32"),
        (lambda: kernels.combine(torch.zeros(3, 8), _permuted()[1], 4), "out_rows has 3 rows"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_value_checks_read_values_unless_the_caller_vouches_for_them():
    """The checks of ids and offsets are host syncs; check_values=False skips them (and only them)."""
    from herd.kernels.host_syncs import HostSyncGuard

    x, gate_up, down = torch.randn(4, 16), torch.randn(2, 16, 32), torch.randn(2, 16, 16)  # sizes grouped_mm takes

    def moe(**check):
        rows, permutation = kernels.permute(x, IDS, SCORES, 2, **check)
        return kernels.experts(rows, permutation.expert_offsets, gate_up, down, **check)

    moe()  # the first call on a device tries grouped_mm once (and reads the result)
    with HostSyncGuard(cuda=False) as checked:
        moe()
    assert [s.split(":")[0] for s in checked.syncs] == ["__int__", "__int__", "tolist"]  # low, high; offsets
    assert all("herd/kernels/api.py" in s for s in checked.syncs), checked.syncs
    with HostSyncGuard(cuda=False, strict=True):
        moe(check_values=False)
    with pytest.raises(ValueError, match=r"topk_ids must be torch\.int32"):  # no value read: still checked
        kernels.permute(X, IDS.long(), SCORES, 4, check_values=False)
    with pytest.raises(ValueError, match=r"expert_offsets must be \[3\]"):
        kernels.experts(X, torch.tensor([0, 4]), GATE_UP, DOWN, check_values=False)
