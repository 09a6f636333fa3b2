"""The trunk's side of expert parallelism: the model's experts executor, over a transport.

Legend: R rows, H hidden, G groups (one per expert, in placement order).

The model routes and permutes in `expert_order`, so each shard's experts are contiguous groups; the
dispatcher cuts the permuted rows into one slice per shard (a replicated expert's rows are split
evenly between its replicas), has the transport run every shard at once, and puts the outputs back
where the rows came from, for the model to combine.
"""

from __future__ import annotations

import torch

from herd.model.llama4 import Llama4Model
from herd.workers.placement import Placement
from herd.workers.transport import ExpertTransport, ShardWork


class ExpertDispatcher:
    """An ExpertsExecutor (herd.model.moe) that sends rows to expert shards."""

    def __init__(self, placement: Placement, transport: ExpertTransport) -> None:
        served = [tuple(sorted(e)) for e in transport.shard_experts()]
        if served != list(placement.shard_experts):
            raise ValueError(f"the shards own {served}, the placement expects {list(placement.shard_experts)}")
        self.placement = placement
        self.transport = transport
        self.expert_order: tuple[int, ...] = placement.expert_order
        self._group = {expert: g for g, expert in enumerate(placement.expert_order)}

    def attach(self, model: Llama4Model) -> None:
        """Route every MoE layer of the model through the shards."""
        model.set_experts_executor(self)

    def healthy(self) -> bool:
        return self.transport.healthy()

    def __call__(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        bounds = expert_offsets.tolist()
        plans = [self._slices(shard, bounds) for shard in range(self.placement.num_shards)]
        work = [ShardWork(counts=[stop - start for start, stop in plan], rows=_take(rows, plan)) for plan in plans]
        outputs = self.transport.run(layer, work)
        out = torch.empty_like(rows)
        for plan, result in zip(plans, outputs, strict=True):
            _put(out, plan, result)
        return out

    def _slices(self, shard: int, bounds: list[int]) -> list[tuple[int, int]]:
        """The row range this shard computes for each of its experts, in its expert order."""
        slices = []
        for expert in self.placement.shard_experts[shard]:
            group = self._group[expert]
            start, stop = bounds[group], bounds[group + 1]
            holders = self.placement.replicas[expert]
            if len(holders) > 1:  # split evenly, in replica order
                i, n = holders.index(shard), len(holders)
                size = stop - start
                start, stop = start + size * i // n, start + size * (i + 1) // n
            slices.append((start, stop))
        return slices


def _take(rows: torch.Tensor, slices: list[tuple[int, int]]) -> torch.Tensor:
    """The rows of the given ranges, concatenated: a view when they touch end to end."""
    spans = [(a, b) for a, b in slices if b > a]
    if not spans:
        return rows[:0]
    if all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
        return rows[spans[0][0] : spans[-1][1]]
    return torch.cat([rows[a:b] for a, b in spans])


def _put(out: torch.Tensor, slices: list[tuple[int, int]], result: torch.Tensor) -> None:
    at = 0
    for start, stop in slices:
        out[start:stop] = result[at : at + stop - start]
        at += stop - start
