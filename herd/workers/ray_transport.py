"""Expert shards reached by Ray actor calls (the object store instead of gRPC)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
import torch

from herd.engine.errors import Code, HerdError
from herd.model.lora import LoRAAdapter
from herd.workers.shard_experts import AdapterAction
from herd.workers.transport import ShardWork, TransportStats


class RayTransport:
    """Every layer's work goes to all shard actors at once; a refusal or a dead actor is a HerdError.

    submit makes the calls, the function it returns waits for them (issue 21: the caller computes meanwhile).
    """

    def __init__(self, actors: list[Any], *, timeout_s: float) -> None:
        self.actors = actors
        self.timeout_s = timeout_s
        self.stats = TransportStats()
        self._experts = ray.get([a.experts.remote() for a in actors], timeout=timeout_s)

    def shard_experts(self) -> list[tuple[int, ...]]:
        return [tuple(e) for e in self._experts]

    def submit(self, layer: int, work: list[ShardWork]) -> Callable[[], list[torch.Tensor]]:
        """Start every shard's actor call now; the function gets their outputs."""
        refs = [a.dispatch.remote(layer, w.counts, w.rows, w.trace_context, w.row_slots)
                for a, w in zip(self.actors, work, strict=True)]
        return lambda: self._get(refs)

    def run(self, layer: int, work: list[ShardWork]) -> list[torch.Tensor]:
        return self.submit(layer, work)()

    def _get(self, refs: list[Any]) -> list[torch.Tensor]:
        try:
            outputs: list[torch.Tensor] = ray.get(refs, timeout=self.timeout_s)
            return outputs
        except ray.exceptions.GetTimeoutError as err:
            late = f"an expert shard did not answer within {self.timeout_s:g} s"
            raise HerdError(Code.DEADLINE_EXCEEDED, late) from err
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            raise HerdError(Code.UNAVAILABLE, f"an expert shard is unavailable: {err}") from err
        except ray.exceptions.RayTaskError as err:  # the shard refused the work (ValueError: a bad dispatch)
            raise HerdError(Code.INTERNAL, f"an expert shard refused the work: {err.cause}") from err
        finally:
            self.stats.calls += 1

    def load_adapter(self, slot: int, adapter: LoRAAdapter, *, slots: int, max_rank: int) -> None:
        """Every shard actor reads the adapter from its path."""
        self._get([a.set_adapter.remote(AdapterAction.LOAD, slot, str(adapter.path), slots, max_rank)
                   for a in self.actors])

    def unload_adapter(self, slot: int) -> None:
        self._get([a.set_adapter.remote(AdapterAction.UNLOAD, slot, "", 0, 0) for a in self.actors])

    def check_adapter(self, adapter: LoRAAdapter) -> None:
        self._get([a.set_adapter.remote(AdapterAction.CHECK, 0, str(adapter.path), 0, 0) for a in self.actors])

    def healthy(self) -> bool:
        try:
            ray.get([a.experts.remote() for a in self.actors], timeout=2.0)
        except Exception:
            return False
        return True

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
