"""Ray Serve: one application per model; a replica is one placement group (trunk + expert shards).

Bundle 0 holds the replica (engine + trunk); bundles 1..N hold the expert-shard actors, scheduled
into the replica's own placement group (STRICT_PACK on one node by default, PACK for multi-node).
Shards serve herd.v1.ExpertShard over gRPC, or answer Ray calls when transport is "ray". The replica
reports engine and shard health to Serve, and drains on shutdown (Serve stops routing to it first).
With args["shard_tls"] (ShardTls.as_args()) the shards' gRPC port and the trunk's channels are mutual TLS.
`build_app` is the import path a Serve config file (and a KubeRay RayService serveConfigV2) names.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import grpc
import ray
import torch
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from herd.engine import EngineConfig
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.replica_core import ReplicaConfig, ReplicaCore, ReplicaError
from herd.workers.transport import ExpertTransport, GrpcTransport, ShardError, ShardTls, ShardWork, TransportStats

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger(__name__)

ProcessSetup = Callable[[str], None]
"""What a replica's or a shard's process runs first, given its role (logs and traces: the platform's
telemetry, injected by herd.platform.replica_app, since this layer never imports the platform)."""


@ray.remote
class ExpertShardActor:
    """An expert shard inside the replica's placement group: a gRPC server, and Ray-callable too."""

    def __init__(self, path: str, experts: list[int], dtype: str, process_setup: ProcessSetup | None = None,
                 tls: ShardTls | None = None) -> None:
        from herd.workers.expert_shard import serve as serve_shard

        if process_setup is not None:
            process_setup("expert-shard")

        host = ray.util.get_node_ip_address()
        credentials = tls.server_credentials() if tls is not None else None
        self.server, self.port, self.service = serve_shard(path, experts, host=host, dtype=_DTYPES[dtype],
                                                           credentials=credentials)
        self.host = host

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def experts(self) -> tuple[int, ...]:
        return self.service.experts

    def dispatch(self, layer: int, counts: list[int], rows: torch.Tensor) -> torch.Tensor:
        from herd import kernels

        weights = self.service.layers[layer]
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        return kernels.experts(rows, offsets, weights.gate_up, weights.down)

    def stop(self) -> None:
        self.server.stop(grace=1)


class RayTransport:
    """Expert shards reached by Ray actor calls (object store instead of gRPC)."""

    def __init__(self, actors: list[Any], *, timeout_s: float) -> None:
        self.actors = actors
        self.timeout_s = timeout_s
        self.stats = TransportStats()
        self._experts = ray.get([a.experts.remote() for a in actors], timeout=timeout_s)

    def shard_experts(self) -> list[tuple[int, ...]]:
        return [tuple(e) for e in self._experts]

    def run(self, layer: int, work: list[ShardWork]) -> list[torch.Tensor]:
        refs = [a.dispatch.remote(layer, w.counts, w.rows) for a, w in zip(self.actors, work, strict=True)]
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            raise ShardError(f"an expert shard did not answer within {self.timeout_s:g} s",
                             code="DEADLINE_EXCEEDED") from err
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            raise ShardError(f"an expert shard is unavailable: {err}", code="UNAVAILABLE") from err
        finally:
            self.stats.calls += 1

    def healthy(self) -> bool:
        try:
            ray.get([a.experts.remote() for a in self.actors], timeout=2.0)
        except Exception:
            return False
        return True

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


@serve.deployment
class ModelReplica:
    """A Serve replica of one model."""

    def __init__(self, args: dict[str, Any], process_setup: ProcessSetup | None = None) -> None:
        if process_setup is not None:
            process_setup("replica")
        self.process_setup = process_setup
        config = replica_config(args)
        self.shards: list[Any] = []
        self.shard_gpus = float(args.get("deployment", {}).get("shard_gpus", 1.0))
        self.shard_tls = ShardTls.from_args(args.get("shard_tls"))
        self.core = ReplicaCore(config, self._transport_factory(config) if config.transport != "local" else None)
        self.metrics_port = self._serve_metrics(args.get("telemetry", {}).get("replica_metrics_port"))

    async def generate(self, request: bytes) -> AsyncIterator[bytes]:
        """Serialized GenerateRequest in, serialized GenerateChunks out (protobuf objects do not pickle)."""
        async for chunk in self.core.generate(pb.GenerateRequest.FromString(request)):
            yield chunk.SerializeToString()

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.GenerateChunk]:
        """The same, under the RPC's name, for Serve's gRPC proxy (a gateway outside Ray). A refusal keeps its
        code: set on Serve's gRPC context before raising, the proxy answers with it instead of INTERNAL."""
        try:
            async for chunk in self.core.generate(request):
                yield chunk
        except ReplicaError as err:
            if grpc_context is not None:
                grpc_context.set_code(getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL))
                grpc_context.set_details(err.message)
            raise

    def model_card(self) -> bytes:
        return self.core.model_card().SerializeToString()

    def stats(self) -> dict[str, int]:
        stats = self.core.stats()
        if self.metrics_port is not None:
            stats["metrics_port"] = self.metrics_port
        return stats

    def check_health(self) -> None:
        if not self.core.healthy():
            raise RuntimeError(f"replica of {self.core.config.name}: an expert shard is not serving")

    async def __del__(self) -> None:
        await self.core.drain()
        for shard in self.shards:
            ray.kill(shard)

    def _serve_metrics(self, port: int | None) -> int | None:
        """/metrics on the configured port; a second replica on the same node finds it taken and takes a free
        one (reported in stats(); a PodMonitor scrapes only the configured port)."""
        if port is None:
            return None
        try:
            bound = self.core.metrics.serve(int(port))
        except OSError as err:
            bound = self.core.metrics.serve(0)
            log.warning("replica of %s: metrics port %d is taken (%s); serving /metrics on %d instead",
                        self.core.config.name, port, err, bound)
        log.info("replica of %s: Prometheus /metrics on port %d", self.core.config.name, bound)
        return bound

    def _transport_factory(self, config: ReplicaConfig):
        def factory(shard_experts: list[tuple[int, ...]]) -> ExpertTransport:
            group = ray.util.get_current_placement_group()
            for index, experts in enumerate(shard_experts):
                strategy = PlacementGroupSchedulingStrategy(placement_group=group,
                                                            placement_group_bundle_index=index + 1)
                options: dict[str, Any] = {"num_cpus": _SHARD_CPUS, "scheduling_strategy": strategy}
                if torch.cuda.is_available():
                    options["num_gpus"] = self.shard_gpus
                dtype = str(config.engine.dtype).removeprefix("torch.")
                self.shards.append(ExpertShardActor.options(**options).remote(config.path, list(experts), dtype,
                                                                              self.process_setup, self.shard_tls))
            if config.transport == "ray":
                return RayTransport(self.shards, timeout_s=config.dispatch_timeout_s)
            addresses = ray.get([s.address.remote() for s in self.shards], timeout=600)
            tls = self.shard_tls
            return GrpcTransport(addresses, timeout_s=config.dispatch_timeout_s,
                                 credentials=tls.channel_credentials() if tls is not None else None,
                                 server_name=tls.server_name if tls is not None else None)

        return factory


_SHARD_CPUS = 1


def replica_config(args: dict[str, Any]) -> ReplicaConfig:
    """The ReplicaConfig in a Serve application's args (plain JSON, as a config file holds them)."""
    engine = dict(args.get("engine", {}))
    if "dtype" in engine:
        engine["dtype"] = _DTYPES[engine["dtype"]]
    fields = {k: args[k] for k in ("name", "path", "num_shards", "transport", "dispatch_timeout_s",
                                   "drain_timeout_s", "stream_interval_s") if k in args}
    step_sample_ratio = float(args.get("telemetry", {}).get("step_sample_ratio", 0.0))
    return ReplicaConfig(**fields, engine=EngineConfig(**engine), step_sample_ratio=step_sample_ratio)


def build_app(args: dict[str, Any], *, process_setup: ProcessSetup | None = None) -> serve.Application:
    """The Serve application of one model: its deployment options come from args["deployment"], its
    telemetry from args["telemetry"] (herd.platform.replica_app:build_app adds the process set-up)."""
    config = replica_config(args)
    deployment = args.get("deployment", {})
    shards = config.num_shards if config.transport != "local" else 0
    gpus = bool(deployment.get("gpus", False))
    trunk_bundle = {"CPU": 1, **({"GPU": deployment.get("trunk_gpus", 1.0)} if gpus else {})}
    shard_bundle = {"CPU": _SHARD_CPUS, **({"GPU": deployment.get("shard_gpus", 1.0)} if gpus else {})}
    options: dict[str, Any] = {
        "name": config.name,
        "max_ongoing_requests": deployment.get("max_ongoing_requests", config.engine.max_num_seqs),
        "max_queued_requests": deployment.get("max_queued_requests", 64),
        "placement_group_bundles": [trunk_bundle] + [shard_bundle] * shards,
        "placement_group_strategy": deployment.get("placement_strategy", "STRICT_PACK"),
        "graceful_shutdown_timeout_s": config.drain_timeout_s,
        "health_check_period_s": deployment.get("health_check_period_s", 10),
        "ray_actor_options": {"num_cpus": 0},  # the replica's share is bundle 0
    }
    autoscaling = deployment.get("autoscaling")
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = deployment.get("num_replicas", 1)
    return ModelReplica.options(**options).bind(args, process_setup)


def replica_states(app_name: str) -> dict[str, int]:
    """Replicas of a Serve application by state (RUNNING, STARTING, STOPPING, ...), from the controller."""
    app = serve.status().applications.get(app_name)
    states: dict[str, int] = {}
    for deployment in app.deployments.values() if app is not None else ():
        for state, count in deployment.replica_states.items():
            name = getattr(state, "value", state)  # a ReplicaState enum; str() gives "ReplicaState.X"
            states[name] = states.get(name, 0) + count
    return states


def config_args(config: ReplicaConfig, deployment: dict[str, Any], telemetry: dict[str, Any] | None = None,
                shard_tls: ShardTls | None = None) -> dict[str, Any]:
    """A ReplicaConfig (plus deployment options, telemetry settings and the shards' mutual TLS, when on) as
    the JSON args of build_app."""
    engine = asdict(config.engine)
    engine["dtype"] = str(config.engine.dtype).removeprefix("torch.")
    return {"name": config.name, "path": config.path, "num_shards": config.num_shards,
            "transport": config.transport, "dispatch_timeout_s": config.dispatch_timeout_s,
            "drain_timeout_s": config.drain_timeout_s, "stream_interval_s": config.stream_interval_s,
            "engine": engine, "deployment": deployment, "telemetry": telemetry or {},
            **({"shard_tls": shard_tls.as_args()} if shard_tls is not None else {})}


__all__ = ["ExpertShardActor", "ModelReplica", "RayTransport", "build_app", "config_args", "replica_states"]
