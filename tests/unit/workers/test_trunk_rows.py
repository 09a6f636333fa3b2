"""Several trunks' rows as one shard batch: each expert's rows contiguous (trunk 0's first), and split back exactly."""

from __future__ import annotations

import torch

from herd.workers.trunk_rows import merge, merged_counts, split


def test_the_batch_groups_each_experts_rows_trunk_by_trunk_and_splits_back():
    counts = [[2, 0, 1], [1, 3, 0], [0, 0, 2]]  # [M=3][E'=3]
    parts = [torch.tensor([[10.0], [11.0], [12.0]]), torch.tensor([[20.0], [21.0], [22.0], [23.0]]),
             torch.tensor([[30.0], [31.0]])]  # trunk t's rows grouped by expert
    batch = merge(counts, parts)
    assert merged_counts(counts) == [3, 3, 3]
    # expert 0: trunk 0's two, trunk 1's one; expert 1: trunk 1's three; expert 2: trunk 0's one, trunk 2's two.
    assert batch.squeeze(1).tolist() == [10.0, 11.0, 20.0, 21.0, 22.0, 23.0, 12.0, 30.0, 31.0]
    back = split(counts, batch * 2)
    for part, out in zip(parts, back, strict=True):
        assert torch.equal(out, part * 2)


def test_trunks_without_rows_and_row_slots_take_the_same_path():
    counts = [[0, 0], [1, 1]]
    slots = [torch.zeros(0, dtype=torch.int64), torch.tensor([4, 5])]
    assert merge(counts, slots).tolist() == [4, 5]
    back = split(counts, torch.tensor([[1.0], [2.0]]))
    assert back[0].shape == (0, 1) and back[1].squeeze(1).tolist() == [1.0, 2.0]
    assert merge([[0], [0]], [torch.zeros(0, 3), torch.zeros(0, 3)]).shape == (0, 3)


def test_control_a_wrong_order_is_seen():
    counts = [[1, 1], [1, 1]]
    parts = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [4.0]])]
    assert merge(counts, parts).squeeze(1).tolist() != torch.cat(parts).squeeze(1).tolist()  # not a plain cat
    swapped = split(counts[::-1], merge(counts, parts))[::-1]
    assert not torch.equal(swapped[0], parts[0])
