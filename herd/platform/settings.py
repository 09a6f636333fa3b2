"""Herd's settings: one typed object, loaded once, from (lowest to highest) defaults, a config file
(YAML or JSON), environment variables (HERD_..., nested with __) and command-line flags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from herd.workers.replica_config import (
    POOLS,
    Disaggregation,
    ReplicaArgs,
    ReplicaConfig,
    ReplicaTelemetry,
    pool_deployment,
)
from herd.workers.shard_tls import ShardTls

PRESETS = ("scout", "maverick")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscaleSettings(_Section):
    """The control plane's policy for one model (used when controlplane.enabled)."""

    min_replicas: int = Field(1, ge=0, description="replicas at least (0: may scale to zero when idle)")
    max_replicas: int = Field(1, ge=1, description="replicas at most")
    target_requests_per_replica: float = Field(32, gt=0, description="requests one replica should carry")
    target_tokens_per_replica: float | None = Field(None, gt=0, description="prompt + max_tokens one replica "
                                                    "should hold (null: requests alone decide)")
    ttft_slo_s: float | None = Field(2.0, gt=0, description="p95 time to first token above this adds a replica")
    scale_up_window_s: float = Field(0, ge=0, description="stabilisation before scaling up")
    scale_down_window_s: float = Field(300, ge=0, description="stabilisation before scaling down")
    idle_to_zero_s: float = Field(900, ge=0, description="idle time before scaling to zero (min_replicas 0)")
    priority: int = Field(0, description="higher is served first when the GPU pool is full")


class PoolAutoscaleSettings(_Section):
    """The control plane's policy for one pool of a disaggregated model (used when controlplane.enabled): as a
    colocated model's `autoscale`, less scale to zero (a pool keeps a replica; its model's proxy routes to it)."""

    min_replicas: int = Field(1, ge=1, description="replicas at least")
    max_replicas: int = Field(1, ge=1, description="replicas at most")
    target_requests_per_replica: float = Field(32, gt=0, description="requests one replica should carry")
    scale_up_window_s: float = Field(0, ge=0, description="stabilisation before scaling up")
    scale_down_window_s: float = Field(300, ge=0, description="stabilisation before scaling down")
    priority: int = Field(0, description="higher is served first when the GPU pool is full")

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class PrefillAutoscaleSettings(PoolAutoscaleSettings):
    """The prefill pool's: requests waiting for their first token, and time to first token."""

    target_requests_per_replica: float = Field(8, gt=0, description="requests waiting for their first token one "
                                               "prefill replica should carry")
    ttft_slo_s: float | None = Field(2.0, gt=0, description="p95 time to first token above this adds a replica")


class DecodeAutoscaleSettings(PoolAutoscaleSettings):
    """The decode pool's: requests in flight (or their tokens), inter-token latency and KV use."""

    target_requests_per_replica: float = Field(32, gt=0, description="requests in flight one decode replica "
                                               "should carry")
    target_tokens_per_replica: float | None = Field(None, gt=0, description="prompt + max_tokens one replica "
                                                    "should hold (null: requests alone decide)")
    itl_slo_s: float | None = Field(0.1, gt=0, description="p95 inter-token latency above this adds a replica "
                                    "(null: off)")
    kv_use_high_water: float | None = Field(0.9, gt=0, le=1, description="a decode replica's KV blocks in use, of "
                                            "its pool, above this fraction adds a replica (null: off; read by herd "
                                            "serve, not yet by herd controlplane)")


class DisaggregationSettings(Disaggregation):
    """A model's disaggregation (herd.workers.replica_config.Disaggregation, what its replicas read) and how the
    control plane scales its pools."""

    prefill_autoscale: PrefillAutoscaleSettings = Field(default_factory=PrefillAutoscaleSettings)
    decode_autoscale: DecodeAutoscaleSettings = Field(default_factory=DecodeAutoscaleSettings)

    def replica_part(self) -> Disaggregation:
        """What the replicas read of it."""
        return Disaggregation(**{name: getattr(self, name) for name in Disaggregation.model_fields})


class ModelSettings(ReplicaConfig):
    """One served model: what its replicas run (ReplicaConfig) and what the gateway and the control plane
    read of it (the fields below)."""

    model_config = ConfigDict(frozen=False, extra="forbid")

    autoscale: AutoscaleSettings = Field(default_factory=AutoscaleSettings, description="the control plane's "
                                         "policy for a colocated model (a disaggregated one's pools: "
                                         "disaggregation.prefill_autoscale and decode_autoscale)")
    disaggregation: DisaggregationSettings | None = Field(None, description="prefill/decode disaggregation: a "
                                                          "prefill and a decode pool behind one ingress "
                                                          "(deployment.num_replicas proxies); null: off (every "
                                                          "replica runs whole requests)")
    cold_start_wait_s: float = Field(30, ge=0, description="a request for a model with no ready replica (scaled "
                                     "to zero) waits this long for one, then gets 503 + Retry-After")
    cold_start_retry_after_s: int = Field(30, ge=1, description="Retry-After of that 503: about a cold start")
    serve_grpc_target: str | None = Field(None, description="herd gateway: Serve's gRPC proxy for this model")
    serve_status_url: str | None = Field(None, description="herd gateway: the Ray dashboard of the model's cluster "
                                         "(its ready replicas; null: requests are never held for one)")

    def replica_args(self, *, path: str, telemetry: TelemetrySettings, shard_tls: ShardTls | None) -> ReplicaArgs:
        """The Serve application's args of this model: its replica settings as they are, with the checkpoint
        `path` resolved on this machine, and the process-wide telemetry and shard TLS."""
        fields = {name: getattr(self, name) for name in ReplicaConfig.model_fields}
        if self.disaggregation is not None:
            fields["disaggregation"] = self.disaggregation.replica_part()
        return ReplicaArgs(**fields | {"path": path}, telemetry=telemetry.model_dump(mode="json"),
                           shard_tls=shard_tls)


class TenancySettings(_Section):
    auth: bool = Field(True, description="require API keys (off only for local experiments: --no-auth)")
    database_url: str = Field("sqlite:///.herd/herd.db", description="tenants, keys and usage (SQLAlchemy URL)")
    redis_url: str | None = Field(None, description="shared rate limits for several gateways; in-process when null")
    admin_token_file: Path = Field(Path(".herd/admin-token"), description="admin credential, made on first start")
    spill_path: Path = Field(Path(".herd/usage-spill.jsonl"), description="usage rows the database would not take")
    usage_flush_interval_s: float = Field(0.5, gt=0, description="how often usage rows are written")
    redis_timeout_s: float = Field(1.0, gt=0, description="longest one Redis call (connect or command) may take")
    database_timeout_s: float = Field(5.0, gt=0, description="longest one database connect or statement may take")
    key_cache_ttl_s: float = Field(5.0, ge=0, description="a verified API key is trusted this long without asking "
                                   "the database (a revoke through another gateway takes effect within it; 0: off)")
    key_cache_size: int = Field(10_000, ge=0, description="verified keys cached at most (least recently used go)")
    default_output_reservation_tokens: int = Field(1024, ge=1, description="a request without max_tokens reserves "
                                                   "this many output tokens (or its room, if less) against the "
                                                   "per-minute limits and the budget; what it produces beyond is "
                                                   "charged when it ends")


class ControlPlaneSettings(_Section):
    enabled: bool = Field(False, description="herd serve: scale replicas with the control plane")
    interval_s: float = Field(10, gt=0, description="seconds between decisions")
    gpu_pool: float | None = Field(None, gt=0, description="GPUs all models may use together; null: unlimited")
    gateway_urls: list[str] = Field(default_factory=list, description="herd controlplane: the gateways' operator URLs "
                                    "(ops_port) whose /herd/load it reads")
    resolve_gateways: bool = Field(False, description="herd controlplane: ask every address of each gateway URL's "
                                   "host (a headless Service: every gateway pod)")
    namespace: str = Field("herd", description="herd controlplane: Kubernetes namespace")
    kubeconfig: Path | None = Field(None, description="herd controlplane outside a cluster: a kubeconfig file "
                                    "(null: the pod's service account, else $KUBECONFIG or ~/.kube/config)")
    lease_name: str = Field("herd-controlplane", description="herd controlplane: Lease for leader election")
    rayservices: dict[str, str] = Field(default_factory=dict, description="model -> RayService name")
    metrics_port: int = Field(9090, ge=0, le=65535, description="herd controlplane: Prometheus /metrics port")


class TelemetrySettings(ReplicaTelemetry):
    """Traces, logs and the replicas' metrics endpoint (the gateway's /metrics is always on)."""

    model_config = ConfigDict(frozen=False, extra="forbid")

    traces: Literal["none", "console", "otlp", "memory"] = Field("none", description="where spans go (memory: "
                                                                 "kept in the process, for tests)")
    otlp_endpoint: str = Field("http://127.0.0.1:4317", description="OTLP/gRPC collector for traces: otlp")
    otlp_insecure: bool = Field(True, description="plain-text OTLP (a collector beside the process)")
    service_name: str = Field("herd", description="service.name of the spans; each part adds its role")
    trace_sample_ratio: float = Field(1.0, ge=0, le=1, description="requests traced, of those without a "
                                      "sampled parent (a caller's sampled traceparent is always followed)")
    log_format: Literal["text", "json"] = Field("text", description="json: one object per line")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="root log level")
    log_prompts: bool = Field(False, description="put prompt and completion text in spans and logs (off: "
                                  "never; key material is never logged)")


class ImageSettings(_Section):
    """Images in chat requests, for models with a vision tower."""

    max_images_per_request: int = Field(8, ge=0, description="most images one chat may carry (more: 400)")
    fetch_urls: bool = Field(False, description="fetch http(s) image_url parts (off: only data: URLs are read); "
                             "the gateway then connects wherever a client's URL points")
    fetch_timeout_s: float = Field(10.0, gt=0, description="longest one image fetch may take in all")
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="largest encoded image, from a data: or http(s) URL "
                                 "on the HTTP door, or an image part on the gRPC door")
    fetch_allow_networks: list[str] = Field(default_factory=list, description="networks (CIDR) an image fetch may "
                                            "reach although they are not public (loopback, private, link-local "
                                            "and the like are refused otherwise)")


class ResponsesSettings(_Section):
    """The Responses API's stored responses (GET /v1/responses/{id}, previous_response_id)."""

    retention_days: float = Field(30, gt=0, description="a stored response is kept this long, then is 404")


class DoorLimits(_Section):
    """What one client may hold at the public doors, whether or not its key is good."""

    http_max_connections: int = Field(1024, ge=1, description="HTTP connections at once; beyond, 503")
    http_keep_alive_timeout_s: float = Field(5, gt=0, description="an idle HTTP connection is closed after this")
    http_read_timeout_s: float = Field(30, gt=0, description="a request's headers and body must arrive within this")
    http_max_header_bytes: int = Field(64 * 2**10, ge=1024, description="largest HTTP request line and headers")
    grpc_max_concurrent_streams: int = Field(64, ge=1, description="gRPC calls at once on one connection")
    grpc_max_message_bytes: int = Field(32 * 2**20, ge=2**20, description="largest gRPC request message")
    grpc_min_ping_interval_s: float = Field(30, gt=0, description="a client pinging more often is disconnected")
    stream_write_timeout_s: float = Field(30, gt=0, description="a streamed answer its client does not read for "
                                          "this long is aborted, and billed for what was streamed")


class TlsSettings(_Section):
    """TLS at the public doors and mutual TLS between each trunk and its expert shards (PEM files; off when unset).

    The shards' one certificate is presented by every shard and by the trunk, so it must allow both server
    and client use, and name each shard's address (or shard_server_name). Relative paths are from the
    working directory; the replicas and shards read the shard files on their own nodes, at the same paths.
    """

    cert_file: Path | None = Field(None, description="HTTP and gRPC doors: server certificate chain (with key_file)")
    key_file: Path | None = Field(None, description="HTTP and gRPC doors: the private key of cert_file")
    client_ca_file: Path | None = Field(None, description="HTTP and gRPC doors: require client certificates signed "
                                        "by this CA (null: no client certificate asked)")
    shard_cert_file: Path | None = Field(None, description="trunk <-> expert shards: the certificate both present")
    shard_key_file: Path | None = Field(None, description="trunk <-> expert shards: the private key of shard_cert_file")
    shard_ca_file: Path | None = Field(None, description="trunk <-> expert shards: the CA a peer's certificate must "
                                       "be signed by (each side refuses a peer without one)")
    shard_server_name: str | None = Field(None, description="the name the trunk checks in a shard's certificate "
                                          "(null: the shard's address, which the certificate must then carry)")

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        groups = (("cert_file", "key_file"), ("shard_cert_file", "shard_key_file", "shard_ca_file"))
        for group in groups:
            given = [name for name in group if getattr(self, name) is not None]
            if given and len(given) < len(group):
                missing = [f"tls.{name}" for name in group if name not in given]
                raise ValueError(f"tls.{given[0]} is set but {', '.join(missing)} is not: set all of "
                                 f"{', '.join(f'tls.{n}' for n in group)} or none")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file needs tls.cert_file and tls.key_file (client certificates need TLS)")
        if self.shard_server_name is not None and self.shard_cert_file is None:
            raise ValueError("tls.shard_server_name needs tls.shard_cert_file, shard_key_file and shard_ca_file")
        for name in ("cert_file", "key_file", "client_ca_file", *groups[1]):
            path = getattr(self, name)
            if path is not None:
                _check_pem(f"tls.{name}", path)
        return self

    @property
    def public(self) -> bool:
        """TLS at the HTTP and gRPC doors."""
        return self.cert_file is not None

    @property
    def shards(self) -> bool:
        """Mutual TLS between the trunk and its expert shards."""
        return self.shard_cert_file is not None


def _check_pem(field: str, path: Path) -> None:
    try:
        text = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{field}: cannot read {path}: {err.strerror or err}") from None
    if b"-----BEGIN " not in text:
        raise ValueError(f"{field}: {path} is not a PEM file (no -----BEGIN line)")


class BatchSettings(_Section):
    """The Files and Batch APIs (they need the tenancy database: not served with --no-auth)."""

    file_dir: Path = Field(Path(".herd/files"), description="where file bytes are kept (owner-only files)")
    max_file_bytes: int = Field(16 * 2**20, ge=1, description="largest file a tenant may upload (the request body "
                                "limit, max_request_body_bytes, applies too)")
    max_queued_lines: int = Field(50_000, ge=1, description="requests a tenant may have waiting across its open "
                                  "batches; a batch that would pass it is refused (429)")
    max_in_flight: int = Field(4, ge=1, description="batch requests this gateway runs at once, all tenants together")
    weight_factor: float = Field(0.1, gt=0, le=1, description="a tenant's batch class has this share of the tenant's "
                                 "fair-share weight in the engine (below interactive traffic)")
    poll_interval_s: float = Field(1.0, gt=0, description="how often the runner looks for work it was not told of "
                                   "(batches resumed, made by another gateway, due to expire)")


class HerdSettings(BaseSettings):
    """Everything `herd serve` needs."""

    model_config = SettingsConfigDict(env_prefix="HERD_", env_nested_delimiter="__", extra="forbid")

    models: list[ModelSettings] = Field(default_factory=lambda: [ModelSettings()], description="served models")
    http_host: str = Field("127.0.0.1", description="OpenAI-compatible HTTP address")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    grpc_host: str = Field("127.0.0.1", description="herd.v1.Inference gRPC address")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port")
    ops_host: str = Field("127.0.0.1", description="operator endpoints (/metrics, /herd/*, /health, /admin/v1)")
    ops_port: int = Field(9401, ge=0, le=65535, description="operator port; the public ports keep only a cheap "
                          "/health/live and /health/ready")
    request_timeout_s: float = Field(600, gt=0, description="longest a request may take")
    migration_attempts: int = Field(2, ge=0, description="times a request whose replica died is sent again to "
                                    "another (continued from the tokens it streamed) before it fails with 503")
    shutdown_timeout_s: float = Field(25, gt=0, description="SIGTERM to exit: in-flight requests may finish within "
                                      "it, then are ended as interrupted and the ledger is written (keep it under "
                                      "the pod's terminationGracePeriodSeconds)")
    max_request_body_bytes: int = Field(16 * 2**20, ge=1, description="largest HTTP request body; a larger one is "
                                        "refused with 413 before it is read")
    models_dir: Path = Field(Path(".herd/models"), description="where tiny presets are made")
    ray_address: str | None = Field(None, description="existing Ray cluster; a local one is started when null")
    ray_num_cpus: int | None = Field(None, ge=1, description="logical CPUs of the local Ray (default: enough)")
    tenancy: TenancySettings = Field(default_factory=TenancySettings)
    controlplane: ControlPlaneSettings = Field(default_factory=ControlPlaneSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    limits: DoorLimits = Field(default_factory=DoorLimits)
    responses: ResponsesSettings = Field(default_factory=ResponsesSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)

    _config_file: ClassVar[Path | None] = None

    @model_validator(mode="after")
    def _one_scaler(self) -> HerdSettings:
        if self.controlplane.enabled:
            both = [m.name for m in self.models if m.deployment.autoscaling is not None]
            if both:
                raise ValueError(f"models {both}: deployment.autoscaling (Ray Serve's autoscaler) and "
                                 "controlplane.enabled (Herd's) cannot both scale a model; set one")
            split = [m.name for m in self.models if m.disaggregation is not None and "autoscale" in m.model_fields_set]
            if split:
                raise ValueError(f"models {split}: autoscale scales a colocated model; the control plane scales a "
                                 "disaggregated model's pools within disaggregation.prefill_autoscale and "
                                 "decode_autoscale")
            names = [m.name for m in self.models]
            pools = {pool_deployment(m.name, p): m.name for m in self.models if m.disaggregation for p in POOLS}
            clash = sorted(set(names) & set(pools))
            if clash:
                raise ValueError(f"models {clash}: named as a pool of model(s) {sorted(pools[c] for c in clash)}; the "
                                 "control plane knows a pool by its deployment (<model>-prefill, <model>-decode)")
        return self

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> HerdSettings:
        """Defaults < config file < environment < overrides (the flags)."""
        cls._config_file = config_file
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            cls._config_file = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls, cls._config_file))


class _FileSource(PydanticBaseSettingsSource):
    """A YAML or JSON config file, read whole."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.data: dict[str, Any] = {}
        if path is not None:
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            text = path.read_text()
            try:
                loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError) as err:
                raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
            self.data = loaded

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)
