"""A Ray Serve replica of one model: one placement group holding the trunk (bundle 0) and its expert shards.

Bundles 1..N hold the expert-shard actors, scheduled into the replica's own placement group (STRICT_PACK on
one node by default, PACK for multi-node). On one node the trunk and its shards form a collective group (rank 0
and 1..N; NCCL on CUDA, gloo on CPU) that carries every MoE layer's rows; its rendezvous goes through Ray: the
trunk opens a TCP store on a free loopback port and tells each shard actor where it is. Across nodes (PACK, or
shard_listen "node") the shards serve herd.v1.ExpertShard over gRPC; with transport "ray" they answer Ray calls.
The replica reports engine and shard health to Serve, and drains on shutdown
(Serve stops routing to it first). With args.shard_tls the shards' port and the trunk's channels are mutual TLS.

Shards listen on loopback unless args.shard_listen is "node", which needs args.shard_tls (checked before
anything starts); on loopback the trunk checks every shard is on its own node, where 127.0.0.1 reaches it.
The replica's /metrics binds args.telemetry.replica_metrics_host (loopback unless the settings open it).
With args.disaggregation a replica serves a prefill or a decode pool (herd.workers.pd_proxy): `prefill` and
`generate_with_kv` are its two sides (herd.workers.kv_handoff).

A shard whose process dies is restarted in place (args.shard_restarts; herd.workers.shard_recovery): Ray starts
the actor again in its bundle, and the replica reconnects it (a gRPC shard's new address; a collective group
re-formed with every shard) and loads its resident LoRA adapters again, holding its steps meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import ray
import torch
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from herd.engine.errors import Code, HerdError
from herd.model.config import load_config
from herd.model.dtypes import dtype_name
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.collective import CollectiveGroup, backend_for, open_rendezvous
from herd.workers.collective_transport import CollectiveTransport
from herd.workers.grpc_transport import GrpcTransport
from herd.workers.kv_handoff import KVHandoff
from herd.workers.kv_transport import Prefilled, kv_transport
from herd.workers.process_setup import ProcessSetup
from herd.workers.ray_transport import RayTransport
from herd.workers.replica_config import BUNDLE_CPUS, ReplicaArgs
from herd.workers.replica_core import ReplicaCore, trunk_device
from herd.workers.shard_actor import LOOPBACK, ExpertShardActor
from herd.workers.shard_recovery import RESTART_TIMEOUT_S, RestartBudget, ShardRecovery
from herd.workers.shard_tls import check_shard_listen
from herd.workers.transport import ExpertTransport

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 600.0
"""How long the trunk and its shards wait for each other to join the replica's collective group (the shards load
their experts first)."""


@serve.deployment
class ModelReplica:
    """A Serve replica of one model; `args` is its application's ReplicaArgs as JSON."""

    def __init__(self, args: dict[str, Any], process_setup: ProcessSetup | None = None) -> None:
        if process_setup is not None:
            process_setup("replica")
        self.process_setup = process_setup
        self.args = ReplicaArgs.model_validate(args)
        check_replica_args(self.args)
        self.shards: list[Any] = []
        factory = self._start_shards if self.args.shard_processes else None
        self.core = ReplicaCore(self.args, factory, step_sample_ratio=self.args.telemetry.step_sample_ratio)
        pd = self.args.disaggregation
        self.handoff = KVHandoff(self.core, kv_transport(pd.kv_transport)) if pd is not None else None
        restarts = self.shards and self.args.shard_restarts and self.args.trunks == 1
        self.recovery = self._watch_shards() if restarts else None
        self.metrics_port = self._serve_metrics(self.args.telemetry.replica_metrics_port)

    async def generate(self, request: bytes) -> AsyncIterator[bytes]:
        """Serialized GenerateRequest in, serialized GenerateChunks out (protobuf objects do not pickle)."""
        async for chunk in self.core.generate(pb.GenerateRequest.FromString(request)):
            yield chunk.SerializeToString()

    async def prefill(self, request: bytes) -> Prefilled:
        """Disaggregation's prefill side: the serialized request's prompt run, its KV put on the transport."""
        return await self._handoff().prefill(pb.GenerateRequest.FromString(request))

    async def generate_with_kv(self, request: bytes, prefilled: Prefilled | None) -> AsyncIterator[bytes]:
        """Disaggregation's decode side: generate, after importing the prompt's KV that `prefilled` names."""
        async for chunk in self._handoff().generate(pb.GenerateRequest.FromString(request), prefilled):
            yield chunk.SerializeToString()

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.GenerateChunk]:
        """The same, under the RPC's name, for Serve's gRPC proxy (a gateway outside Ray). A refusal keeps its
        code: set on Serve's gRPC context before raising, the proxy answers with it instead of INTERNAL."""
        try:
            async for chunk in self.core.generate(request):
                yield chunk
        except HerdError as err:
            if grpc_context is not None:
                grpc_context.set_code(getattr(grpc.StatusCode, err.code.value))
                grpc_context.set_details(err.message)
            raise

    def model_card(self) -> bytes:
        return self.core.model_card().SerializeToString()

    def stats(self) -> dict[str, int]:
        stats = self.core.stats()
        if self.handoff is not None:
            stats |= self.handoff.stats()
        if self.metrics_port is not None:
            stats["metrics_port"] = self.metrics_port
        return stats

    def config(self) -> dict[str, Any]:
        """What this replica runs: its args, and the engine's own config (for operators and tests)."""
        return {"args": self.args.model_dump(mode="json"),
                "engine": self.core.engine_config().model_dump(mode="json")}

    def check_health(self) -> None:
        """Healthy while a dead shard is being restarted in place (its requests are held, not lost: Serve must not
        replace the replica, nor the control plane count it gone); unhealthy once that recovery gave up."""
        recovery = self.recovery
        if recovery is not None:
            if recovery.failed is not None:
                raise RuntimeError(f"replica of {self.args.name}: {recovery.failed}")
            if recovery.recovering:
                return
        if self.core.healthy() or (recovery is not None and recovery.noticed()):
            return
        raise RuntimeError(f"replica of {self.args.name}: an expert shard is not serving")

    async def __del__(self) -> None:
        if self.recovery is not None:
            self.recovery.close()
        await self.core.drain()
        for shard in self.shards:
            ray.kill(shard, no_restart=True)

    def _handoff(self) -> KVHandoff:
        if self.handoff is None:
            raise HerdError(Code.INTERNAL, f"replica of {self.args.name} is not disaggregated (no KV transport)")
        return self.handoff

    def _serve_metrics(self, port: int | None) -> int | None:
        """/metrics on the configured port; a second replica on the same node finds it taken and takes a free
        one (reported in stats(); a PodMonitor scrapes only the configured port)."""
        if port is None:
            return None
        host = self.args.telemetry.replica_metrics_host
        try:
            bound = self.core.metrics.serve(port, host)
        except OSError as err:
            bound = self.core.metrics.serve(0, host)
            log.warning("replica of %s: metrics port %d is taken (%s); serving /metrics on %d instead",
                        self.args.name, port, err, bound)
        log.info("replica of %s: Prometheus /metrics on %s:%d", self.args.name, host, bound)
        return bound

    def _start_shards(self, shard_experts: list[tuple[int, ...]]) -> ExpertTransport | list[ExpertTransport]:
        """One actor per shard in bundles 1..N of this replica's placement group; their transport (each trunk's,
        with several trunks)."""
        args = self.args
        group = ray.util.get_current_placement_group()
        if group is None:  # Serve gives every replica one, from the deployment's placement_group_bundles
            raise RuntimeError(f"replica of {args.name} is in no placement group: its shards have no bundles")
        for index, experts in enumerate(shard_experts):
            strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index + 1)
            restarts = args.shard_restarts and args.trunks == 1  # several trunks: a dead shard restarts the replica
            options: dict[str, Any] = {"num_cpus": BUNDLE_CPUS, "scheduling_strategy": strategy,
                                       "max_restarts": -1 if restarts else 0}
            if torch.cuda.is_available():
                options["num_gpus"] = args.deployment.shard_gpus
            device = args.engine.device if args.dispatch_transport == "collective" else "cpu"
            self.shards.append(ExpertShardActor.options(**options).remote(  # type: ignore[attr-defined]
                args.path, list(experts), dtype_name(args.engine.dtype), self.process_setup, args.shard_tls,
                listen=args.shard_listen, step_tokens=args.engine.max_num_batched_tokens, device=device))
        if args.dispatch_transport == "collective" and args.trunks > 1:
            return self._join_collective_trunks()
        if args.dispatch_transport == "collective":
            return self._join_collective()
        if args.dispatch_transport == "ray":
            return RayTransport(self.shards, timeout_s=args.dispatch_timeout_s)
        addresses: list[str] = ray.get([s.address.remote() for s in self.shards], timeout=600)
        limits: list[int] = ray.get([s.max_message_bytes.remote() for s in self.shards], timeout=60)
        if args.shard_listen == "loopback":
            nodes = ray.get([s.node_id.remote() for s in self.shards], timeout=60)
            here = ray.get_runtime_context().get_node_id()
            elsewhere = [a for a, node in zip(addresses, nodes, strict=True) if node != here]
            if elsewhere:  # 127.0.0.1 would reach this node, not theirs
                raise RuntimeError(f"replica of {args.name}: shards {elsewhere} listen on loopback but run on another "
                                   "node than the trunk; use placement_strategy STRICT_PACK, or shard_listen 'node' "
                                   "with shard_tls")
        tls = args.shard_tls
        return GrpcTransport(addresses, timeout_s=args.dispatch_timeout_s, max_message_bytes=max(limits),
                             credentials=tls.channel_credentials() if tls is not None else None,
                             server_name=tls.server_name if tls is not None else None)


    def _join_collective(self) -> CollectiveTransport:
        """The trunk's group with its shard actors (all on this node): rank 0 here, shard i as rank i + 1."""
        args = self.args
        text = load_config(args.path).text
        return CollectiveTransport(self._form_group(), num_experts=text.num_local_experts,
                                   moe_layers=len(text.moe_layers), hidden_size=text.hidden_size,
                                   dtype=args.engine.dtype, timeout_s=args.dispatch_timeout_s,
                                   probe=self._shards_serving, restartable=args.shard_restarts > 0)

    def _join_collective_trunks(self) -> list[ExpertTransport]:
        """The replica's M trunks (ranks 0..M-1, all in this process: one thread joins each, as a group forms only
        once every rank has) and its shard actors (ranks M..M+N-1); each trunk's transport, in lockstep (M:N)."""
        args, trunks = self.args, self.args.trunks
        text = load_config(args.path).text
        backend = backend_for(args.engine.device)
        world = trunks + len(self.shards)
        store, rendezvous = open_rendezvous(LOOPBACK, world, backend=backend, timeout_s=JOIN_TIMEOUT_S)
        joined = [shard.join_collective.remote(rendezvous, rank, None, trunks=trunks)
                  for rank, shard in enumerate(self.shards, start=trunks)]

        def trunk(rank: int) -> CollectiveTransport:
            group = CollectiveGroup(rendezvous, rank, device=trunk_device(args.engine.device, rank),
                                    store=store if rank == 0 else None)
            return CollectiveTransport(group, num_experts=text.num_local_experts, moe_layers=len(text.moe_layers),
                                       hidden_size=text.hidden_size, dtype=args.engine.dtype,
                                       timeout_s=args.dispatch_timeout_s, probe=self._shards_serving, trunks=trunks,
                                       layers=text.moe_layers)

        with ThreadPoolExecutor(max_workers=trunks) as threads:
            transports: list[ExpertTransport] = list(threads.map(trunk, range(trunks)))
        ray.get(joined, timeout=JOIN_TIMEOUT_S)
        return transports

    def _form_group(self, experts: Sequence[tuple[int, ...]] | None = None,
                    timeout_s: float = JOIN_TIMEOUT_S) -> CollectiveGroup:
        """A new group of the trunk and every shard actor (each holding `experts[i]` when given)."""
        backend = backend_for(self.args.engine.device)
        store, rendezvous = open_rendezvous(LOOPBACK, len(self.shards) + 1, backend=backend, timeout_s=timeout_s)
        ray.get([shard.join_collective.remote(rendezvous, rank, list(experts[rank - 1]) if experts else None)
                 for rank, shard in enumerate(self.shards, start=1)], timeout=timeout_s)
        return CollectiveGroup(rendezvous, 0, device=self.args.engine.device, store=store)

    def _watch_shards(self) -> ShardRecovery:
        metrics = self.core.metrics
        dispatcher = self.core.dispatcher
        assert dispatcher is not None, "shard processes come with a dispatcher"

        def observe(seconds: float) -> None:
            metrics.shard_restarts.inc()
            metrics.shard_recovery.observe(seconds)

        recovery = ShardRecovery(self.shards, self._restore_shard, budget=RestartBudget(self.args.shard_restarts),
                                 pause=lambda lost: dispatcher.pause(lost=lost), resume=dispatcher.resume,
                                 observe=observe)
        metrics.shard_recovering.set_function(lambda: float(recovery.recovering))
        return recovery

    def _restore_shard(self, index: int) -> None:
        """Shard `index`'s process died (ShardRecovery's thread): the survivors leave a broken collective group,
        Ray starts the shard again, the transport reaches it (its new address, or a group re-formed with every
        shard), and it gets the resident LoRA adapters again. Engine steps are paused meanwhile."""
        dispatcher = self.core.dispatcher
        assert dispatcher is not None, "shard processes come with a dispatcher"
        transport = dispatcher.transport
        if isinstance(transport, CollectiveTransport):
            alive = [i for i in range(len(self.shards)) if i != index]
            self.core.between_steps(lambda: transport.leave(alive))
        actor = self.shards[index]
        restarted = _after_restart(actor.address)  # its new port (any call waits for the restarted actor)
        if isinstance(transport, GrpcTransport):
            self.core.between_steps(lambda: transport.reconnect(index, restarted))
        elif isinstance(transport, CollectiveTransport):
            group = self._form_group(dispatcher.placement.shard_experts, RESTART_TIMEOUT_S)
            self.core.between_steps(lambda: transport.rejoin(group))
        self.core.between_steps(dispatcher.reload_adapters)

    def _shards_serving(self) -> bool:
        try:
            return all(ray.get([shard.serving.remote() for shard in self.shards], timeout=2.0))
        except Exception:
            return False


def _after_restart(method: Any) -> Any:
    """An actor method's answer once Ray has started the dead actor again (its constructor done: its experts
    loaded); a call made while Ray has not yet seen the death fails, so it is made again until RESTART_TIMEOUT_S."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        try:
            return ray.get(method.remote(), timeout=max(deadline - time.monotonic(), 0.1))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def check_replica_args(args: ReplicaArgs) -> None:
    """What the args' own validation cannot see across fields: shards on the node's address need shard mTLS;
    expert balancing needs shard processes in a collective group (they move the experts)."""
    if args.shard_processes:
        check_shard_listen(args.shard_listen, args.shard_tls)
    if args.balance.enabled and (not args.shard_processes or args.dispatch_transport != "collective"):
        raise ValueError(f"model {args.name}: balance.enabled needs expert shards over the collective transport "
                         f"(shards > 0 and transport collective, or auto on one node); this replica's shards "
                         f"{'use ' + args.dispatch_transport if args.shard_processes else 'are in its process'}")

