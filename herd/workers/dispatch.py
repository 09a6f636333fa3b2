"""The trunk's side of expert parallelism: the model's experts executor, over a transport.

Legend: R rows, H hidden, G groups (one per expert, in placement order).

The model routes and permutes in `expert_order`, so each shard's experts are contiguous groups; the
dispatcher cuts the permuted rows into one slice per shard (a replicated expert's rows are split
evenly between its replicas), has the transport run every shard at once, and puts the outputs back
where the rows came from, for the model to combine.

On a traced engine step (a recording span is current) every layer's dispatch is a span too, and its
context travels with the work, so the shards' compute spans join the trace. Every call adds its rows
to the expert load and, when given, reports its duration (herd_expert_dispatch_seconds).

Submit and wait (issue 21): `submit` sends every shard its rows and returns a function that waits for
the outputs, so the model computes its shared expert while the rows are out. The load is counted at
submit; the duration and a traced step's dispatch span run from the submit to the end of the wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from opentelemetry import propagate, trace

from herd.model.llama4 import Llama4Model
from herd.workers.expert_load import ExpertLoad
from herd.workers.placement import Placement, copy_rows
from herd.workers.transport import ExpertTransport, ShardWork

tracer = trace.get_tracer("herd.workers.dispatch")


@runtime_checkable
class PlacementMover(Protocol):
    """A transport whose shards can take a new placement while serving."""

    def replace(self, old: Placement, new: Placement) -> None: ...


class ExpertDispatcher:
    """An ExpertsExecutor (herd.model.moe) that sends rows to expert shards."""

    def __init__(self, placement: Placement, transport: ExpertTransport, *, load: ExpertLoad | None = None,
                 observe_s: Callable[[float], None] | None = None) -> None:
        # In order, not as sets: each shard's counts are sent in the placement's expert order.
        served = [tuple(e) for e in transport.shard_experts()]
        if served != list(placement.shard_experts):
            raise ValueError(f"the shards own {served} (in their count order), the placement expects "
                             f"{list(placement.shard_experts)}")
        self.transport = transport
        self._use(placement)
        self.load = load or ExpertLoad(len(placement.expert_order))
        self.observe_s = observe_s

    def attach(self, model: Llama4Model) -> None:
        """Route every MoE layer of the model through the shards."""
        model.set_experts_executor(self)

    def healthy(self) -> bool:
        return self.transport.healthy()

    def replace(self, placement: Placement) -> None:
        """Re-place the experts (live balancing), between steps: the shards move weights among themselves, then
        the rows follow the new placement. Only a transport that can move experts live (collective) can."""
        if not isinstance(self.transport, PlacementMover):
            raise ValueError(f"{type(self.transport).__name__} cannot re-place experts while serving (the collective "
                             "transport can)")
        self.transport.replace(self.placement, placement)
        self._use(placement)

    def _use(self, placement: Placement) -> None:
        self.placement = placement
        self.expert_order: tuple[int, ...] = placement.expert_order
        self._group = {expert: g for g, expert in enumerate(placement.expert_order)}

    def __call__(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        return self.submit(layer, rows, expert_offsets)()

    def submit(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Send every shard its rows now; the returned function waits for the outputs, in the rows' places."""
        start = time.perf_counter()
        bounds = expert_offsets.tolist()
        self.load.add(layer, self.expert_order, bounds)
        if not trace.get_current_span().is_recording():
            return self._finish(*self._send(layer, rows, bounds, {}), rows, start)
        # The span covers the dispatch from the sends to the end of the wait, but is current only while
        # this code runs: what the caller does in between (the shared expert) is not inside it.
        span = tracer.start_span("herd.expert_dispatch", attributes={
            "herd.layer": layer, "herd.rows": rows.shape[0], "herd.shards": self.placement.num_shards})
        try:
            with trace.use_span(span):
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                plans, wait = self._send(layer, rows, bounds, carrier)
        except BaseException:
            span.end()  # use_span recorded the error
            raise
        finish = self._finish(plans, wait, rows, start)

        def traced() -> torch.Tensor:
            with trace.use_span(span, end_on_exit=True):
                return finish()

        return traced

    def _send(self, layer: int, rows: torch.Tensor, bounds: list[int], trace_context: dict[str, str],
              ) -> tuple[list[list[tuple[int, int]]], Callable[[], list[torch.Tensor]]]:
        plans = [self._slices(shard, bounds) for shard in range(self.placement.num_shards)]
        work = [ShardWork(counts=[stop - start for start, stop in plan], rows=_take(rows, plan),
                          trace_context=trace_context) for plan in plans]
        return plans, self.transport.submit(layer, work)

    def _finish(self, plans: list[list[tuple[int, int]]], wait: Callable[[], list[torch.Tensor]], rows: torch.Tensor,
                start: float) -> Callable[[], torch.Tensor]:
        """The wait: the shards' outputs put back where their rows came from, and the duration observed."""
        def finish() -> torch.Tensor:
            outputs = wait()
            out = torch.empty_like(rows)
            for plan, result in zip(plans, outputs, strict=True):
                _put(out, plan, result)
            if self.observe_s is not None:
                self.observe_s(time.perf_counter() - start)
            return out

        return finish

    def _slices(self, shard: int, bounds: list[int]) -> list[tuple[int, int]]:
        """The row range this shard computes for each of its experts, in its expert order."""
        slices = []
        for expert in self.placement.shard_experts[shard]:
            group = self._group[expert]
            start, stop = bounds[group], bounds[group + 1]
            holders = self.placement.replicas[expert]
            if len(holders) > 1:  # split between the copies, in replica order
                first, last = copy_rows(stop - start, holders.index(shard), len(holders))
                start, stop = start + first, start + last
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
