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

LoRA: the dispatcher is the model's expert sink (herd.model.lora_bank.ExpertAdapterSink): the bank hands it each
adapter it loads, and the shards hold the routed-expert factors for their experts (herd.workers.shard_adapters).
Rows of a layer some resident adapter covers come with their row slots, cut like the rows. A re-placement moves
experts between shards without their factors, so the dispatcher loads every resident adapter on the shards again.

A shard restarting in place (herd.workers.shard_recovery) pauses the dispatcher: its steps fail with a retryable
UNAVAILABLE (the engine holds their requests) until the shard is back with every resident adapter loaded again;
a recovery that gave up leaves it refusing with reason experts_lost (the requests end and move to another replica).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from opentelemetry import propagate, trace

from herd.engine.errors import Code, HerdError
from herd.engine.fault_hold import EXPERTS_LOST
from herd.model.llama4 import Llama4Model
from herd.model.lora import LoRAAdapter
from herd.model.lora_config import AdapterError
from herd.workers.expert_load import ExpertLoad
from herd.workers.placement import Placement, copy_rows
from herd.workers.transport import AdapterTransport, ExpertTransport, ShardWork

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
        self._adapters: dict[int, tuple[LoRAAdapter, int, int]] = {}  # slot -> (adapter, slots, max_rank) on shards
        self._paused: tuple[str, str | None] | None = None  # (message, reason) of every step's error while paused

    def attach(self, model: Llama4Model) -> None:
        """Route every MoE layer of the model through the shards."""
        model.set_experts_executor(self)

    def healthy(self) -> bool:
        return self.transport.healthy()

    def pause(self, *, lost: bool = False) -> None:
        """Refuse every step until resume(): a shard is restarting (UNAVAILABLE, held by the engine), or, `lost`,
        will not come back (UNAVAILABLE with reason experts_lost: never held)."""
        message = "an expert shard of this replica is " + ("unavailable" if lost else "restarting")
        self._paused = (message, EXPERTS_LOST if lost else None)

    def resume(self) -> None:
        self._paused = None

    def reload_adapters(self) -> None:
        """Load every resident adapter on the shards again (a restarted shard holds none); between steps."""
        for slot, (adapter, slots, max_rank) in sorted(self._adapters.items()):
            self._adapter_transport().load_adapter(slot, adapter, slots=slots, max_rank=max_rank)

    def replace(self, placement: Placement) -> None:
        """Re-place the experts (live balancing), between steps: the shards move weights among themselves, then
        the rows follow the new placement. Only a transport that can move experts live (collective) can."""
        if not isinstance(self.transport, PlacementMover):
            raise ValueError(f"{type(self.transport).__name__} cannot re-place experts while serving (the collective "
                             "transport can)")
        self.transport.replace(self.placement, placement)
        self._use(placement)
        self.reload_adapters()  # the moved experts' factors

    def load_expert_adapter(self, slot: int, adapter: LoRAAdapter, *, slots: int, max_rank: int) -> None:
        """The shards hold `adapter`'s routed-expert factors in bank slot `slot` (between steps)."""
        self._adapters.pop(slot, None)
        self._adapter_transport().load_adapter(slot, adapter, slots=slots, max_rank=max_rank)
        self._adapters[slot] = (adapter, slots, max_rank)

    def unload_expert_adapter(self, slot: int) -> None:
        """The shards empty bank slot `slot`."""
        self._adapters.pop(slot, None)
        self._adapter_transport().unload_adapter(slot)

    def check_expert_adapter(self, adapter: LoRAAdapter) -> None:
        """AdapterError unless every shard can read `adapter` and hold its factors (at registration); a shard
        unreachable or late is the transport's HerdError."""
        try:
            self._adapter_transport().check_adapter(adapter)
        except ValueError as err:
            raise AdapterError(f"{adapter.path}: the expert shards cannot hold it: {err}") from err
        except HerdError as err:
            if err.code != Code.INTERNAL:  # a shard gone or late, not a refusal
                raise
            raise AdapterError(f"{adapter.path}: the expert shards cannot hold it: {err.message}") from err

    def _adapter_transport(self) -> AdapterTransport:
        if not isinstance(self.transport, AdapterTransport):
            raise ValueError(f"{type(self.transport).__name__} cannot hold LoRA adapters on its expert shards; an "
                             "adapter covering routed experts needs the in-process, gRPC, Ray or collective transport")
        return self.transport

    def _use(self, placement: Placement) -> None:
        self.placement = placement
        self.expert_order: tuple[int, ...] = placement.expert_order
        self._group = {expert: g for g, expert in enumerate(placement.expert_order)}

    def __call__(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor,
                 row_slots: torch.Tensor | None = None) -> torch.Tensor:
        return self.submit(layer, rows, expert_offsets, row_slots)()

    def submit(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor,
               row_slots: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
        """Send every shard its rows (with LoRA, their row slots [R]) now; the function waits for the outputs, in
        the rows' places."""
        if self._paused is not None:
            message, reason = self._paused
            raise HerdError(Code.UNAVAILABLE, message, reason=reason)
        start = time.perf_counter()
        bounds = expert_offsets.tolist()
        self.load.add(layer, self.expert_order, bounds)
        if not trace.get_current_span().is_recording():
            return self._finish(*self._send(layer, rows, row_slots, bounds, {}), rows, start)
        # The span covers the dispatch from the sends to the end of the wait, but is current only while
        # this code runs: what the caller does in between (the shared expert) is not inside it.
        span = tracer.start_span("herd.expert_dispatch", attributes={
            "herd.layer": layer, "herd.rows": rows.shape[0], "herd.shards": self.placement.num_shards})
        try:
            with trace.use_span(span):
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                plans, wait = self._send(layer, rows, row_slots, bounds, carrier)
        except BaseException:
            span.end()  # use_span recorded the error
            raise
        finish = self._finish(plans, wait, rows, start)

        def traced() -> torch.Tensor:
            with trace.use_span(span, end_on_exit=True):
                return finish()

        return traced

    def _send(self, layer: int, rows: torch.Tensor, row_slots: torch.Tensor | None, bounds: list[int],
              trace_context: dict[str, str]) -> tuple[list[list[tuple[int, int]]], Callable[[], list[torch.Tensor]]]:
        plans = [self._slices(shard, bounds) for shard in range(self.placement.num_shards)]
        work = [ShardWork(counts=[stop - start for start, stop in plan], rows=_take(rows, plan),
                          trace_context=trace_context,
                          row_slots=None if row_slots is None else _take(row_slots, plan)) for plan in plans]
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
    """The rows [R, ...] of the given ranges, concatenated: a view when they touch end to end."""
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
