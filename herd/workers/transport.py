"""How the trunk reaches its expert shards: one interface, and the in-process transport.

Legend: R rows, H hidden. A transport takes, per shard, the rows for its experts and the row count
of each of its experts (in the shard's own expert order), runs them on every shard at once, and
returns each shard's outputs in the same order. `submit` starts every shard and returns a function that
waits for the outputs, so the caller can work while the rows are out (the shared expert, issue 21); `run`
is submit, then wait. Failures surface as HerdError (a shard unreachable, late or refusing), which the
engine turns into failed requests. Every transport ends in ShardExperts.compute on the shard's side
(herd.workers.shard_experts); the others are herd.workers.grpc_transport, ray_transport and collective_transport.

LoRA (herd.workers.shard_adapters): a transport that can carry adapters (AdapterTransport) sends each shard's
row slots with its rows, and loads or empties a bank slot on every shard between steps. The in-process transport
hands the shards the adapter the trunk loaded; the others send its path, and each shard reads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from herd.model.lora import LoRAAdapter
from herd.workers.shard_experts import ShardExperts


@dataclass(frozen=True)
class ShardWork:
    counts: list[int]  # rows per owned expert, in the shard's expert order
    rows: torch.Tensor  # [sum(counts), H]
    trace_context: dict[str, str] = field(default_factory=dict)  # W3C context on a traced step
    row_slots: torch.Tensor | None = None  # [sum(counts)] int64: each row's bank slot + 1 (0: base); None: no LoRA


@dataclass
class TransportStats:
    """Where dispatch time went, summed over calls (for benchmarks and metrics)."""

    calls: int = 0
    serialize_s: float = 0.0
    wait_s: float = 0.0  # blocked waiting for the shards (wire and remote compute not hidden by the caller's work)
    deserialize_s: float = 0.0
    compute_s: float = 0.0  # expert compute: in this process, or the slowest shard's as it reports


class ExpertTransport(Protocol):
    stats: TransportStats

    def shard_experts(self) -> list[tuple[int, ...]]:
        """Experts each shard owns, in the order its counts refer to."""
        ...

    def submit(self, layer: int, work: list[ShardWork]) -> Callable[[], list[torch.Tensor]]:
        """Start every shard's work; the returned function waits for and returns the outputs (same as run)."""
        ...

    def run(self, layer: int, work: list[ShardWork]) -> list[torch.Tensor]:
        """Every shard's outputs [R_s, H] for its rows, computed concurrently where possible: submit, then wait."""
        ...

    def healthy(self) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class AdapterTransport(Protocol):
    """A transport whose shards hold LoRA adapters' routed-expert factors (and so take ShardWork.row_slots)."""

    def load_adapter(self, slot: int, adapter: LoRAAdapter, *, slots: int, max_rank: int) -> None:
        """Every shard holds `adapter`'s factors for its experts in bank slot `slot` (HerdError or ValueError if
        one cannot)."""
        ...

    def unload_adapter(self, slot: int) -> None:
        """Every shard empties bank slot `slot`."""
        ...

    def check_adapter(self, adapter: LoRAAdapter) -> None:
        """HerdError or ValueError unless every shard could load `adapter` (at registration; nothing is held)."""
        ...


class InProcessTransport:
    """Shards as plain weight slices in this process (one GPU, or tests): no copies, no wire."""

    def __init__(self, shards: list[ShardExperts]) -> None:
        self.shards = shards
        self.stats = TransportStats()

    def shard_experts(self) -> list[tuple[int, ...]]:
        return [shard.experts for shard in self.shards]

    def submit(self, layer: int, work: list[ShardWork]) -> Callable[[], list[torch.Tensor]]:
        """Computes at once (nothing to overlap with in one process); the function hands the outputs over."""
        outputs = self.run(layer, work)
        return lambda: outputs

    def run(self, layer: int, work: list[ShardWork]) -> list[torch.Tensor]:
        start = time.perf_counter()
        outputs = [shard.compute(layer, item.counts, item.rows, item.trace_context, item.row_slots)
                   for shard, item in zip(self.shards, work, strict=True)]
        self.stats.calls += 1
        self.stats.compute_s += time.perf_counter() - start
        return outputs

    def load_adapter(self, slot: int, adapter: LoRAAdapter, *, slots: int, max_rank: int) -> None:
        for shard in self.shards:
            shard.load_adapter(slot, adapter, slots=slots, max_rank=max_rank)

    def unload_adapter(self, slot: int) -> None:
        for shard in self.shards:
            shard.unload_adapter(slot)

    def check_adapter(self, adapter: LoRAAdapter) -> None:
        for shard in self.shards:
            shard.check_adapter(adapter)

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass


