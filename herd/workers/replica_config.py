"""What a model replica runs: one pydantic model from the settings file to the Serve replica.

`ReplicaConfig` is the part of a model's settings that the replica reads; herd.platform.settings'
ModelSettings extends it with what only the gateway and the control plane read. `ReplicaArgs` is exactly
the JSON args of the model's Serve application (`herd serve --print-config`, the Helm chart's serveConfigV2,
which passes the chart's model values through unchanged): a ReplicaConfig plus the process-wide telemetry
and the shards' mutual TLS. So a replica setting is one field here (or in EngineConfig or DeploymentConfig)
and its chart value: nothing in between copies it field by field.
"""

from __future__ import annotations

from typing import Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from herd.engine.config import EngineConfig
from herd.workers.shard_tls import ShardTls

BUNDLE_CPUS = 1
"""Logical CPUs of each bundle of a replica's placement group (the trunk's and every shard's)."""


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServeAutoscaling(_Config):
    """Ray Serve's own autoscaling_config of a deployment."""

    min_replicas: int = Field(1, ge=0, description="replicas kept at least (0: scale to zero)")
    max_replicas: int = Field(1, ge=1, description="replicas at most")
    target_ongoing_requests: float = Field(32, gt=0, description="requests per replica Serve aims for")


class DeploymentConfig(_Config):
    """The Serve deployment of a model: replicas, admission, and the placement group of each replica."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count when autoscaling is off")
    autoscaling: ServeAutoscaling | None = Field(None, description="Ray Serve autoscaling; off when null")
    max_ongoing_requests: int | None = Field(None, ge=1, description="per replica; default max_num_seqs")
    max_queued_requests: int = Field(64, ge=0, description="waiting beyond this is refused at once (429)")
    placement_strategy: Literal["STRICT_PACK", "PACK"] = Field("STRICT_PACK", description="PACK for multi-node")
    gpus: bool = Field(False, description="GPU bundles: trunk_gpus for the trunk, shard_gpus for each shard")
    trunk_gpus: float = Field(1.0, ge=0, description="GPUs of the trunk's bundle (fractional shares a device)")
    shard_gpus: float = Field(1.0, ge=0, description="GPUs of each expert shard's bundle")
    health_check_period_s: float = Field(10, gt=0, description="how often Serve asks a replica")
    request_router: Literal["prefix", "power_of_two", "round_robin"] = Field(
        "power_of_two", description="how a request picks its replica: prefix (the replica most likely to hold the "
        "longest tenant-salted prefix of its prompt, least loaded when that one is overloaded), power_of_two "
        "(Serve's default: the shorter queue of two), round_robin (in turn; a baseline for benchmarks)")
    prefix_imbalance_requests: int = Field(8, ge=0, description="prefix routing leaves the replica holding the "
                                           "prefix when its queue is this many requests longer than the "
                                           "shortest one (then least loaded wins)")


class ExpertBalance(_Config):
    """Live expert balancing (EPLB) between steps; needs the collective transport (its shards move experts)."""

    enabled: bool = Field(False, description="re-place and replicate hot experts across the shards while serving")
    interval_steps: int = Field(1000, ge=1, description="engine steps between two looks at the expert load")
    min_tokens: int = Field(4096, ge=1, description="tokens routed since the last look needed to plan from them")
    spare_slots: int = Field(1, ge=0, description="experts each shard may hold beyond its even share (copies of "
                             "hot experts; each costs one expert's weights of every MoE layer)")
    min_gain: float = Field(0.1, ge=0, lt=1, description="move only when the slowest shard's expected rows drop by "
                            "at least this fraction")


class Disaggregation(_Config):
    """Prefill/decode disaggregation (as vLLM's disaggregated prefill): a prefill pool runs each prompt and hands its
    KV blocks to a decode pool, which runs the request itself from them (its output is the colocated one's)."""

    prefill_replicas: int = Field(1, ge=1, description="replicas that run prompts and export their KV")
    decode_replicas: int = Field(1, ge=1, description="replicas that import a prompt's KV and generate")
    kv_transport: Literal["ray"] = Field("ray", json_schema_extra={"enum": ["ray"]},  # the chart's schema says so
                                         description="how a prompt's KV goes from prefill to decode: ray (Ray's "
                                         "object store)")


Pool = Literal["prefill", "decode"]
POOLS: tuple[Pool, ...] = ("prefill", "decode")


def pool_deployment(model: str, pool: Pool) -> str:
    """The Serve deployment of a disaggregated model's pool (in the model's application): <model>-<pool>."""
    return f"{model}-{pool}"


class ReplicaConfig(_Config):
    """What one replica serves and how its experts are hosted."""

    name: str = Field("scout", description="the model name clients ask for")
    path: str = Field("scout", description="checkpoint directory, or a tiny preset (scout, maverick) made on use")
    shards: int = Field(2, ge=0, description="expert shards per replica (0: experts in the trunk)")
    trunks: int = Field(1, ge=1, le=16, description="attention trunks per replica (issue 28's M:N): each a copy of "
                        "the trunk with its own KV cache and scheduler (on CUDA each on its own GPU of the trunk's "
                        "bundle), requests spread over them, all stepping in lockstep over the collective group to "
                        "the same shards; more than 1 needs the collective transport, and runs without live expert "
                        "balancing, LoRA, disaggregation or shard restarts in place")
    transport: Literal["auto", "collective", "grpc", "ray", "local"] = Field(
        "auto", description="how the trunk reaches its shards: collective (a torch.distributed group: NCCL on CUDA, "
        "gloo on CPU; one node), grpc (also across nodes), ray (object store), local (the shards' experts in the "
        "trunk's process); auto: collective when every shard is on the trunk's node (STRICT_PACK, loopback, no "
        "shard TLS) and the engine runs on the CPU, else grpc (NCCL has not yet run on a GPU here: set "
        "collective to use it)")
    dispatch_timeout_s: float = Field(30, gt=0, description="a shard that does not answer a layer step in this "
                                      "time fails the step (DEADLINE_EXCEEDED)")
    shard_restarts: int = Field(5, ge=0, description="a shard whose process dies is restarted in place (Ray starts "
                                "it again, the replica reconnects it and holds its steps meanwhile) at most this "
                                "many times in 10 minutes; past that, or 0, the replica reports unhealthy and is "
                                "restarted whole")
    shard_listen: Literal["loopback", "node"] = Field("loopback", description="where expert shards listen: "
                                                      "loopback (every shard beside its trunk: STRICT_PACK) or "
                                                      "the node's address (PACK over nodes; needs shard mTLS)")
    drain_timeout_s: float = Field(30, ge=0, description="graceful shutdown: time for in-flight streams")
    stream_interval_s: float = Field(0.05, ge=0, description="after the first token, send a stream at most this "
                                     "often (each message through Ray Serve costs about a millisecond of CPU); with "
                                     "more than 10 streams in flight each waits 5 ms per stream instead, so a "
                                     "replica sends about 200 messages a second; 0: every step")
    balance: ExpertBalance = Field(default_factory=ExpertBalance)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    disaggregation: Disaggregation | None = Field(None, description="prefill/decode disaggregation: a prefill and a "
                                                  "decode pool behind one ingress (deployment.num_replicas proxies); "
                                                  "null: off (every replica runs whole requests)")

    @model_validator(mode="after")
    def _check_trunks(self) -> Self:
        """Several trunks step in lockstep over one collective group to shard processes, and not with what moves
        experts, loads adapters on the shards, hands KV between pools or runs a step as one graph."""
        if self.engine.context_parallel not in (1, self.trunks):
            raise ValueError(f"model {self.name}: engine.context_parallel is {self.engine.context_parallel}; a "
                             f"replica shares its global-layer KV over all of its trunks ({self.trunks}) or none (1)")
        if self.trunks == 1:
            return self
        if not self.shard_processes or self.dispatch_transport != "collective":
            raise ValueError(f"model {self.name}: trunks > 1 needs expert shard processes over the collective "
                             "transport (shards > 0 and transport collective, or auto on one node)")
        engine = self.engine
        eagle3 = engine.speculative is not None and engine.speculative.method == "eagle3"
        clashes = {"balance.enabled": self.balance.enabled, "engine.max_loras > 0": bool(engine.max_loras),
                   "disaggregation": self.disaggregation is not None, "engine.speculative eagle3": eagle3,
                   "engine.async_scheduling": engine.async_scheduling,
                   "engine.static_decode / cuda_graphs": engine.use_static_decode}
        if on := [name for name, value in clashes.items() if value]:
            raise ValueError(f"model {self.name}: trunks > 1 does not run with {', '.join(on)} yet (the trunks step in "
                             "lockstep, each step micro_batches forwards, and trunk 0 alone controls the shards)")
        return self

    @model_validator(mode="after")
    def _check_disaggregation(self) -> Self:
        if self.disaggregation is None:
            return self
        if not self.engine.enable_prefix_caching:
            raise ValueError(f"model {self.name}: disaggregation needs engine.enable_prefix_caching (a decode replica "
                             "takes the prompt's blocks from its prefix cache)")
        if self.deployment.autoscaling is not None:
            raise ValueError(f"model {self.name}: disaggregation sizes its pools with prefill_replicas and "
                             "decode_replicas; deployment.autoscaling would scale only the proxy in front of them")
        return self

    @property
    def dispatch_transport(self) -> Literal["collective", "grpc", "ray", "local"]:
        """The transport this replica uses (auto resolved)."""
        if self.transport != "auto":
            return self.transport
        one_node = self.deployment.placement_strategy == "STRICT_PACK" and self.shard_listen == "loopback"
        proven = torch.device(self.engine.device).type == "cpu"  # gloo; NCCL is written but unproven on a GPU
        return "collective" if one_node and proven else "grpc"

    @property
    def shard_processes(self) -> int:
        """Shard actors each replica starts (a local transport keeps its shards in the trunk's process)."""
        return self.shards if self.transport != "local" else 0

    @property
    def gpus_per_replica(self) -> float:
        d = self.deployment
        return self.trunks * d.trunk_gpus + self.shard_processes * d.shard_gpus if d.gpus else 0.0


class ReplicaTelemetry(BaseModel):
    """What a replica reads of the telemetry settings itself; the rest (herd.platform.settings'
    TelemetrySettings) rides along for the process set-up the platform injects."""

    model_config = ConfigDict(frozen=True, extra="allow")

    step_sample_ratio: float = Field(0.01, ge=0, le=1, description="engine steps traced with a span per MoE "
                                     "layer's expert dispatch (and the shards' compute spans)")
    replica_metrics_host: str = Field("127.0.0.1", description="address of each replica's /metrics (0.0.0.0 "
                                      "where Prometheus scrapes the pod)")
    replica_metrics_port: int | None = Field(0, ge=0, le=65535, description="each model replica serves "
                                             "Prometheus /metrics here (0: a free port, in /herd/stats; null: off)")


class ReplicaArgs(ReplicaConfig):
    """The args of a model's Serve application (herd.platform.replica_app:build_app), as JSON."""

    telemetry: ReplicaTelemetry = Field(default_factory=ReplicaTelemetry)
    shard_tls: ShardTls | None = Field(None, description="mutual TLS between the trunk and its shards")

    @property
    def dispatch_transport(self) -> Literal["collective", "grpc", "ray", "local"]:
        """As ReplicaConfig's, but auto keeps gRPC where shard TLS is configured (TLS is gRPC's)."""
        if self.transport == "auto" and self.shard_tls is not None:
            return "grpc"
        return super().dispatch_transport


__all__ = ["BUNDLE_CPUS", "POOLS", "DeploymentConfig", "Disaggregation", "ExpertBalance", "Pool", "ReplicaArgs",
           "ReplicaConfig", "ReplicaTelemetry", "ServeAutoscaling", "pool_deployment"]
