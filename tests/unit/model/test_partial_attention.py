"""Attention over parts of the keys, merged by their log-sum-exp, equals attention over all of them; a merge that
ignores the softmax mass (a plain mean) does not."""

from __future__ import annotations

import pytest
import torch

from herd.model.causal_attention import attend
from herd.model.partial_attention import attend_partial, combine_partials, merge_partials

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _case(seed, heads, kv_heads, *, keys=40, queries=9, dim=16):
    """Queries at the end of a sequence (as a prefill chunk's), the keys of every position up to them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(queries, heads, dim, generator=g) * 2  # sharp enough that a wrong weight shows
    k = torch.randn(keys, kv_heads, dim, generator=g)
    v = torch.randn(keys, kv_heads, dim, generator=g)
    k_positions = torch.arange(keys)
    q_positions = torch.arange(keys - queries, keys)
    return q, k, v, q_positions, k_positions


def _split(keys, parts, seed):
    """`parts` disjoint, non-empty, arbitrary (not contiguous) index sets covering 0..keys-1."""
    g = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(keys, generator=g)
    cuts = sorted(torch.randperm(keys - 1, generator=g)[: parts - 1].add(1).tolist())
    return [piece.sort().values for piece in torch.tensor_split(order, cuts)]


def _partials(q, k, v, q_positions, k_positions, chunk, pieces):
    return [attend_partial(q, k[i], v[i], q_positions, k_positions[i], chunk) for i in pieces]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 1), (4, 4)])
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("parts", [2, 3])
def test_merged_parts_equal_attention_over_all_keys(seed, heads, kv_heads, chunk, parts):
    q, k, v, qp, kp = _case(seed, heads, kv_heads)
    whole = attend(q, k, v, qp, kp, chunk)  # [T, N, D]
    merged = merge_partials(_partials(q, k, v, qp, kp, chunk, _split(k.shape[0], parts, seed)))
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, whole, **TOLERANCE)


@pytest.mark.parametrize("seed", [0, 1])
def test_combined_parts_are_a_part_again_with_the_unions_log_sum_exp(seed):
    """Merging in two levels ((A, B), C) equals merging A, B, C at once: combine_partials' lse is the union's."""
    q, k, v, qp, kp = _case(seed, 4, 2)
    a, b, c = _partials(q, k, v, qp, kp, None, _split(k.shape[0], 3, seed))
    ab = combine_partials([a, b])
    torch.testing.assert_close(merge_partials([ab, c]), merge_partials([a, b, c]), **TOLERANCE)
    torch.testing.assert_close(ab[1], torch.logaddexp(a[1], b[1]), **TOLERANCE)
    torch.testing.assert_close(combine_partials([a, b, c])[1], attend_partial(q, k, v, qp, kp, None)[1], **TOLERANCE)


def test_one_part_is_attention_itself():
    q, k, v, qp, kp = _case(3, 4, 2)
    out, lse = attend_partial(q, k, v, qp, kp, None)
    torch.testing.assert_close(out, attend(q, k, v, qp, kp, None), **TOLERANCE)
    assert lse.shape == (q.shape[0], q.shape[1]) and torch.isfinite(lse).all()


def test_rows_that_see_no_key_of_a_part_weigh_nothing():
    # Part "late" holds only keys after every query (causally invisible) plus, with chunk 16, keys of another
    # chunk for some rows: those rows get lse -inf and output 0 there, and the merge still equals attend.
    q, k, v, qp, kp = _case(4, 4, 2, keys=48, queries=20)
    qp = torch.arange(20, 40)  # queries in the middle: keys 40..47 are in their future
    early, late = torch.arange(0, 30), torch.arange(30, 48)
    for chunk in (None, 16):
        parts = _partials(q, k, v, qp, kp, chunk, [early, late])
        out_late, lse_late = parts[1]
        blind = qp < 30  # these rows see none of keys 30..47
        assert torch.isneginf(lse_late[blind]).all() and (out_late[blind] == 0).all()
        assert torch.isfinite(lse_late[~blind]).all()
        torch.testing.assert_close(merge_partials(parts), attend(q, k, v, qp, kp, chunk), **TOLERANCE)


def test_an_empty_part_and_a_row_with_no_key_anywhere():
    q, k, v, qp, kp = _case(5, 4, 2)
    none = torch.arange(0)
    out, lse = attend_partial(q, k[none], v[none], qp, kp[none], None)
    assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all()
    whole = attend_partial(q, k, v, qp, kp, None)
    torch.testing.assert_close(merge_partials([whole, (out, lse)]), whole[0], rtol=0, atol=0)
    assert (merge_partials([(out, lse)]) == 0).all()


def test_a_plain_mean_of_the_parts_is_not_attention():
    # The control: the same parts merged without their softmax mass are far from attend.
    q, k, v, qp, kp = _case(0, 4, 2)
    parts = _partials(q, k, v, qp, kp, None, _split(k.shape[0], 2, 0))
    mean = torch.stack([out for out, _ in parts]).mean(dim=0)
    assert (mean - attend(q, k, v, qp, kp, None)).abs().max() > 0.1
    wrong_lse = [(out, lse + shift) for (out, lse), shift in zip(parts, (0.0, 2.0), strict=True)]
    assert (merge_partials(wrong_lse) - attend(q, k, v, qp, kp, None)).abs().max() > 0.1


def test_merge_needs_a_part():
    with pytest.raises(ValueError):
        merge_partials([])
