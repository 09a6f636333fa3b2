"""Where a sequence's global blocks live, kept as its table grows, is trimmed and is replaced: always what walking
the whole table says."""

from __future__ import annotations

import torch

from herd.engine.block_pool import BlockPool
from herd.engine.sequence import Status
from herd.engine.shared_blocks import SharedBlocks
from herd.engine.spread_index import SpreadIndex
from tests.unit.engine.fakes import BLOCK, seq

CPU = torch.device("cpu")


def _walked(view, table):
    """The blocks of each trunk by walking the table: what the index must equal."""
    out: dict[int, list[tuple[int, int]]] = {}
    for i, block in enumerate(table):
        trunk, local = view.holder(block)
        out.setdefault(trunk, []).append((local, i * BLOCK))
    return {t: torch.tensor(rows).T for t, rows in out.items()}


def _same(index, s, table, view):
    got = index.blocks(s, table)
    expected = _walked(view, table)
    assert got.keys() == expected.keys()
    for trunk in got:
        assert torch.equal(got[trunk], expected[trunk]), trunk
    assert index.trunks(s, table) == set(expected)


def test_the_index_follows_a_table_that_grows_is_trimmed_and_grows_again():
    shared = SharedBlocks([BlockPool(128), BlockPool(128)])
    view = shared.view(0)
    held_elsewhere = [view.allocate() for _ in range(124)]  # 4 home blocks left
    index = SpreadIndex(view, BLOCK, CPU)
    s = seq("a", 8)
    table: list[int | None] = [view.allocate() for _ in range(3)]
    assert index.trunks(s, table) == {0}  # all home: not spread, and no columns built
    table += [view.allocate() for _ in range(3)]  # the fourth at home, then trunk 1's
    _same(index, s, table, view)
    for _ in range(80):  # many appends past the first columns' room
        table.append(view.allocate())
    _same(index, s, table, view)
    for block in table[-5:]:  # rejected drafts' blocks taken back ...
        view.release(block)
    del table[-5:]
    _same(index, s, table, view)
    table += [view.allocate() for _ in range(7)]  # ... and others allocated in their place
    _same(index, s, table, view)
    assert len(held_elsewhere) == 124


def test_a_table_replaced_is_indexed_anew_and_finished_sequences_are_forgotten():
    shared = SharedBlocks([BlockPool(8), BlockPool(8)])
    view = shared.view(1)
    index = SpreadIndex(view, BLOCK, CPU)
    s = seq("a", 8)
    first = [view.allocate() for _ in range(10)]  # 8 home (trunk 1), then trunk 0's 2
    _same(index, s, first, view)
    again = list(reversed(first))  # the same blocks, another list: admitted again
    _same(index, s, again, view)
    s.status = Status.FINISHED
    index.forget_finished()
    assert not index._entries
