"""Ray Serve request routers of a model's replicas (DeploymentConfig.request_router; Serve's own power of two
choices is the default): thin wrappers around pure decisions.

A router lives in the process that holds the deployment handle (the gateway, or Serve's proxy) and Serve asks
it, per request, for ranks of replicas to try; Serve then takes the shortest queue within the first rank that
has room (probing replicas whose queue length it has not seen lately) and backs off when none has.

- PrefixAwareRouter: Herd's generate requests go where the longest tenant-salted prefix of their prompt went
  before (herd.workers.prefix_affinity), so a chat's turns meet the KV blocks of the previous ones; the rest
  (model_card, stats, config) to the shortest queue.
- RoundRobinRouter: in turn, skipping replicas whose queue is full; a baseline for benchmarks.

Serve pickles a router's module by value into every process that routes: nothing stateful may live at this
module's top level (the counters are router_metrics', imported as a module).
"""

from __future__ import annotations

import pickle
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from ray.serve._private.replica_result import ReplicaResult
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers import router_metrics
from herd.workers.prefix_affinity import CHUNK_TOKENS, MAX_ENTRIES, PrefixAffinity, ReplicaLoad, cache_salt, rank

GENERATE_METHODS = frozenset({"generate", "Generate", "prefill", "generate_with_kv"})
"""ModelReplica's methods that take a GenerateRequest first (serialized through a handle; a message through
Serve's gRPC proxy); prefill and generate_with_kv are the disaggregated pools' (herd.workers.pd_proxy)."""
PENDING_PROMPTS = 4096
"""Keys kept of requests being routed (dropped oldest first: a request cancelled before it was routed)."""
_PICKLE_PROTOCOL_2_PLUS = 0x80
"""First byte of a pickle (protocol 2 or later); never the first byte of a GenerateRequest, whose fields are
numbered under 16 (their tags fit in one byte below 0x80)."""


def generate_request(arg: object) -> pb.GenerateRequest | None:
    """The GenerateRequest a replica's generate call carries: serialized bytes (the gateway's handle), a message,
    or Serve's gRPC proxy's pickled gRPCRequest around the message; None for anything else."""
    if isinstance(arg, pb.GenerateRequest):
        return arg
    if not isinstance(arg, bytes):
        return None
    if arg[:1] == bytes([_PICKLE_PROTOCOL_2_PLUS]):
        try:  # the proxy pickled it in this process: ray.serve._private.common.gRPCRequest
            message = getattr(pickle.loads(arg), "user_request_proto", None)
        except Exception:  # not a pickle after all
            return None
        return message if isinstance(message, pb.GenerateRequest) else None
    try:
        return pb.GenerateRequest.FromString(arg)
    except DecodeError:
        return None


@dataclass(frozen=True)
class _Prompt:
    salt: str
    keys: list[bytes]


class PrefixAwareRouter(RequestRouter):
    """The replica that served the longest prefix of the prompt (under the request's cache salt) first, unless
    its queue is longer than the shortest by more than imbalance_requests; else the least loaded."""

    def initialize_state(  # type: ignore[override]  # Serve calls it with request_router_kwargs, by name
            self, imbalance_requests: int = 8, max_entries: int = MAX_ENTRIES, chunk_tokens: int = CHUNK_TOKENS,
            seed: int | None = None) -> None:
        """Serve's request_router_kwargs. chunk_tokens: the engine's block_size; seed: the order of equally
        loaded replicas (tests)."""
        if imbalance_requests < 0:
            raise ValueError(f"imbalance_requests must be at least 0, got {imbalance_requests}")
        self.affinity: PrefixAffinity[ReplicaID] = PrefixAffinity(chunk_tokens=chunk_tokens,
                                                                  max_entries=max_entries)
        self.imbalance_requests = imbalance_requests
        self._rng = random.Random(seed)
        self._prompts: OrderedDict[str, _Prompt] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # after these ranks, wait before the next try
        prompt = self._prompt(pending_request)
        if prompt is None or not candidate_replicas:
            return [candidate_replicas]  # Serve takes the shortest queue
        by_id = {r.replica_id: r for r in candidate_replicas}
        matched, _ = self.affinity.match(prompt.keys, by_id)
        loads = await self._loads(candidate_replicas)
        return [[by_id[replica_id]] for replica_id in rank(loads, matched, self.imbalance_requests, self._rng)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        prompt = self._prompts.pop(pending_request.metadata.internal_request_id, None)
        if prompt is None:
            return
        _, held = self.affinity.match(prompt.keys, (replica_id,))
        self.affinity.count(prompt.salt, held)
        router_metrics.count_routed(self._deployment_id.name, held)
        self.affinity.record(prompt.keys, replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self._replica_id_set)
        super().update_replicas(replicas)
        for replica_id in before - self._replica_id_set:
            self.affinity.forget(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget(replica_id)

    def _prompt(self, pending_request: PendingRequest | None) -> _Prompt | None:
        """The salt and keys of a generate request (computed once; Serve may ask again after a backoff)."""
        if pending_request is None or pending_request.metadata.call_method not in GENERATE_METHODS \
                or not pending_request.args:
            return None
        request_id = pending_request.metadata.internal_request_id
        if (prompt := self._prompts.get(request_id)) is not None:
            return prompt
        request = generate_request(pending_request.args[0])
        if request is None:
            return None
        prompt = _Prompt(cache_salt(request.tenant), self.affinity.keys(request))
        self._prompts[request_id] = prompt
        while len(self._prompts) > PENDING_PROMPTS:
            self._prompts.popitem(last=False)
        return prompt

    async def _loads(self, replicas: list[RunningReplica]) -> list[ReplicaLoad[ReplicaID]]:
        """Each replica's queue length: from Serve's cache, probing the ones it has not seen lately."""
        cache = self.replica_queue_len_cache
        lengths: dict[ReplicaID, int | None] = {r.replica_id: cache.get(r.replica_id) for r in replicas}
        unknown = [r for r in replicas if lengths[r.replica_id] is None]
        if unknown:
            for replica, queue_len in await self._probe_queue_lens(unknown, 0):
                lengths[replica.replica_id] = queue_len
        return [ReplicaLoad(r.replica_id, lengths[r.replica_id], r.max_ongoing_requests) for r in replicas]


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn; a replica whose queue is full (as last seen) is passed over
    for the ones after it, and tried last."""

    def initialize_state(self, **kwargs: Any) -> None:
        """kwargs: what the deployment passes every router (imbalance_requests); unused here."""
        self._turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        start = self._turn % len(candidate_replicas)
        self._turn += 1
        ordered = candidate_replicas[start:] + candidate_replicas[:start]
        room = {id(r) for r in self.select_available_replicas(ordered)}
        return [[r] for r in sorted(ordered, key=lambda r: id(r) not in room)]  # a stable sort keeps the turn


__all__ = ["GENERATE_METHODS", "PrefixAwareRouter", "RoundRobinRouter", "generate_request"]
