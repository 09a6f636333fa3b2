"""Where each sequence's global blocks live, kept as its table changes (context parallelism, issue 28).

Legend: L blocks of one sequence held by one trunk, B tokens per block.

Planning a step must not walk a long sequence's whole block table: a 10M-token sequence holds 655,360 global blocks
of 16 tokens. The index keeps, per sequence, the block ids it has seen and how many each trunk holds, and, once the
sequence is spread over trunks, each trunk's blocks as columns on the device (its block id there, the block's first
position): [2, L]. Each step looks only at what changed at the table's end: blocks appended since, or taken back and
replaced (a trim of rejected drafts, then new blocks), which only ever happens at the end. A table the manager
replaced (the sequence preempted, then admitted again) is indexed anew; finished sequences' entries are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from herd.engine.sequence import Sequence
from herd.engine.shared_blocks import SharedBlockView


class _Columns:
    """A growing [2, n] int64 on the device: (block id at its trunk, first position) of one trunk's blocks."""

    def __init__(self, device: torch.device) -> None:
        self.data = torch.empty(2, 64, dtype=torch.long, device=device)
        self.n = 0

    def extend(self, rows: list[tuple[int, int]]) -> None:
        if self.n + len(rows) > self.data.shape[1]:
            grown = torch.empty(2, 2 * (self.n + len(rows)), dtype=torch.long, device=self.data.device)
            grown[:, : self.n] = self.data[:, : self.n]
            self.data = grown
        self.data[:, self.n : self.n + len(rows)] = torch.tensor(rows, dtype=torch.long).T.to(self.data.device)
        self.n += len(rows)

    @property
    def view(self) -> torch.Tensor:
        return self.data[:, : self.n]  # [2, L]


@dataclass
class _Entry:
    seq: Sequence
    table: list[int | None]  # the manager's list itself: another list means the sequence was admitted again
    ids: list[int] = field(default_factory=list)  # the table's entries indexed so far
    count: dict[int, int] = field(default_factory=dict)  # blocks each trunk holds
    columns: dict[int, _Columns] | None = None  # each trunk's blocks, once the sequence is spread


class SpreadIndex:
    """One trunk's index of its sequences' global blocks."""

    def __init__(self, blocks: SharedBlockView, block_size: int, device: torch.device) -> None:
        self.view, self.block_size, self.device = blocks, block_size, device
        self._entries: dict[str, _Entry] = {}

    def trunks(self, seq: Sequence, table: list[int | None]) -> set[int]:
        """The trunks holding any of the sequence's global blocks (brought up to date with its table)."""
        entry = self._update(seq, table)
        return {trunk for trunk, n in entry.count.items() if n}

    def blocks(self, seq: Sequence, table: list[int | None]) -> dict[int, torch.Tensor]:
        """Each trunk's blocks of the sequence, [2, L] (block id there, first position), in table order."""
        entry = self._update(seq, table)
        if entry.columns is None:  # spread for the first time: every block so far, once
            entry.columns = {}
            self._extend(entry, 0)
        return {trunk: columns.view for trunk, columns in entry.columns.items() if columns.n}

    def forget_finished(self) -> None:
        for rid in [rid for rid, entry in self._entries.items() if entry.seq.is_finished]:
            del self._entries[rid]

    def _update(self, seq: Sequence, table: list[int | None]) -> _Entry:
        entry = self._entries.get(seq.request_id)
        if entry is None or entry.table is not table:
            entry = self._entries[seq.request_id] = _Entry(seq, table)
        ids = entry.ids
        while ids and (len(ids) > len(table) or table[len(ids) - 1] != ids[-1]):  # taken back at the end
            trunk = self.view.holder(ids.pop())[0]
            entry.count[trunk] -= 1
            if entry.columns is not None:
                entry.columns[trunk].n -= 1
        first = len(ids)
        for block in table[first:]:
            assert block is not None, "a global table holds every block"
            ids.append(block)
            trunk = self.view.holder(block)[0]
            entry.count[trunk] = entry.count.get(trunk, 0) + 1
        if entry.columns is not None:
            self._extend(entry, first)
        return entry

    def _extend(self, entry: _Entry, first: int) -> None:
        """Columns for the entry's blocks from table index `first` on."""
        assert entry.columns is not None
        new: dict[int, list[tuple[int, int]]] = {}
        for i in range(first, len(entry.ids)):
            trunk, local = self.view.holder(entry.ids[i])
            new.setdefault(trunk, []).append((local, i * self.block_size))
        for trunk, rows in new.items():
            entry.columns.setdefault(trunk, _Columns(self.device)).extend(rows)
