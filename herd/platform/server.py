"""`herd serve`: a local Ray cluster, one Serve application per model, and the gateway's two doors.

Ctrl-C (or SIGTERM) stops it in order: the doors stop accepting, in-flight requests drain (Serve
drains its replicas), then Ray goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
import yaml
from pydantic import BaseModel

from herd.model.tiny import make_tiny
from herd.platform.settings import PRESETS, HerdSettings, ModelSettings, TenancySettings
from herd.platform.telemetry.logs import redact
from herd.platform.telemetry.tracing import flush_traces
from herd.platform.tenancy.setup import Tenancy, start_tenancy
from herd.workers.replica_config import ReplicaArgs
from herd.workers.shard_tls import ShardTls

if TYPE_CHECKING:
    from herd.platform.tenancy.adapter_registry import AdapterRegistry
    from herd.platform.tenancy.store import TenantStore

log = logging.getLogger("herd.serve")
EMBEDDED_DATABASE_URL: str = TenancySettings.model_fields["database_url"].default


def adapter_registry(settings: HerdSettings, store: TenantStore) -> AdapterRegistry:
    """The LoRA adapter registry over `store` (a TenantStore), checking adapters against the served models."""
    from herd.platform.tenancy.adapter_check import AdapterModel, model_checker
    from herd.platform.tenancy.adapter_registry import AdapterRegistry

    models = {m.name: AdapterModel(model_path(m, settings), m.engine.max_loras, m.engine.max_lora_rank)
              for m in settings.models}
    return AdapterRegistry(store, model_checker(models))


def model_path(model: ModelSettings, settings: HerdSettings) -> Path:
    """The checkpoint of a model: its path, or a tiny preset made on first use."""
    if model.path in PRESETS:
        path = settings.models_dir / f"tiny-{model.path}"
        if not (path / "config.json").is_file():
            log.info("making the tiny %s checkpoint in %s", model.path, path)
            make_tiny(path, preset=model.path)
        return path.resolve()
    path = Path(model.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {model.name}: no checkpoint (config.json) at {path}")
    return path.resolve()


def replica_args(model: ModelSettings, settings: HerdSettings) -> ReplicaArgs:
    """The args of herd.platform.replica_app:build_app for one model: its checkpoint resolved (a preset made),
    and the shards' TLS files as absolute paths (not resolved: a Kubernetes Secret's files are symlinks that
    change on rotation), which the replica and its shards open on their own nodes."""
    tls = settings.tls
    cert, key, ca = (p.absolute() if p is not None else None
                     for p in (tls.shard_cert_file, tls.shard_key_file, tls.shard_ca_file))
    shard_tls = ShardTls.of(cert, key, ca, server_name=tls.shard_server_name)
    return model.replica_args(path=str(model_path(model, settings)), telemetry=settings.telemetry,
                              shard_tls=shard_tls)


def app_args(model: ModelSettings, settings: HerdSettings) -> dict[str, Any]:
    """replica_args as the JSON a Serve config holds, as the Helm chart writes it from its values: keys sorted,
    and no null where null is the default anyway (Helm drops null values; shard_tls is null in plain text)."""
    return _json(replica_args(model, settings))


def _json(model: BaseModel) -> dict[str, Any]:
    return _pruned(model, model.model_dump(mode="json"))


def _pruned(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (model's JSON) with keys sorted, less the nulls that are their field's default, all the way down."""
    fields = type(model).model_fields
    out = {}
    for name, value in sorted(data.items()):
        if value is None and name in fields and fields[name].default is None:
            continue
        child = getattr(model, name, None)
        out[name] = _pruned(child, value) if isinstance(child, BaseModel) else value
    return out


def serve_config(settings: HerdSettings) -> dict[str, Any]:
    """A Ray Serve config for `serve deploy`, embeddable as a KubeRay RayService's serveConfigV2."""
    return {
        # Serve's gRPC proxy is how a gateway outside Ray (the Helm chart's) reaches the replicas.
        "proxy_location": "EveryNode",
        "grpc_options": {
            "port": 9000,
            "grpc_servicer_functions": ["herd.protos.herd.v1.inference_pb2_grpc.add_InferenceServicer_to_server"],
        },
        "applications": [
            # A route prefix, or Serve's proxies (gRPC included) do not route to the application at all.
            {"name": m.name, "route_prefix": f"/{m.name}", "import_path": "herd.platform.replica_app:build_app",
             "args": app_args(m, settings)}
            for m in settings.models
        ],
    }


def _replicas_at_most(model: ModelSettings) -> int:
    """Model replicas (each a placement group) the model's application runs at most: both pools when disaggregated."""
    pd = model.disaggregation
    if pd is not None:
        return pd.prefill_replicas + pd.decode_replicas
    return max(model.deployment.num_replicas, model.autoscale.max_replicas)


def print_config(settings: HerdSettings) -> str:
    return yaml.safe_dump(serve_config(settings), sort_keys=False)


async def run(settings: HerdSettings) -> None:
    """herd serve: a local Ray cluster with one Serve application per model, the gateway's two doors,
    and (when enabled) the control plane scaling the applications."""
    import ray
    from ray import serve

    from herd.platform.gateway.serve_backend import ServeBackend
    from herd.platform.replica_app import build_app

    apps = {m.name: app_args(m, settings) for m in settings.models}
    needed = sum((1 + m.shard_processes) * _replicas_at_most(m) for m in settings.models)
    # The control plane scales through Serve's external-scaler REST call, which the dashboard serves.
    scaled = settings.controlplane.enabled
    if settings.ray_address:
        context = ray.init(address=settings.ray_address, log_to_driver=False)
    else:
        context = ray.init(num_cpus=settings.ray_num_cpus or max(4, needed + 2), include_dashboard=scaled,
                           dashboard_host="127.0.0.1", log_to_driver=False)
    serve.start(proxy_location="Disabled")
    try:
        for model in settings.models:
            log.info("deploying %s from %s (%d shards, %s transport)", model.name, apps[model.name]["path"],
                     model.shards, model.dispatch_transport)
            serve.run(build_app(apps[model.name]), name=model.name, route_prefix=None, external_scaler_enabled=scaled)
        backends = {m.name: await ServeBackend.connect(m.name) for m in settings.models}

        def control_plane(gateway: Any) -> Any:
            if not scaled:
                return None
            from herd.platform.controlplane.app import local_control_plane

            if not context.dashboard_url:
                raise RuntimeError("the control plane needs the Ray dashboard, and this Ray cluster has none")
            return local_control_plane(settings, gateway, context.dashboard_url)

        await serve_doors(settings, backends, control_plane, dev_tenant=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        log.info("stopped")


async def run_gateway(settings: HerdSettings) -> None:
    """herd gateway: the two doors alone, reaching each model through Ray Serve's gRPC proxy."""
    from herd.platform.gateway.serve_grpc_backend import ServeGrpcBackend

    backends = {}
    for model in settings.models:
        if not model.serve_grpc_target:
            raise ValueError(f"model {model.name}: serve_grpc_target (Serve's gRPC proxy) is not set")
        backends[model.name] = ServeGrpcBackend(model.name, model_path(model, settings), model.serve_grpc_target,
                                                engine=model.engine,
                                                status_url=model.serve_status_url)
    await serve_doors(settings, backends, lambda _gateway: None)


async def serve_doors(settings: HerdSettings, backends: dict[str, Any], control_plane: Any, *,
                      dev_tenant: bool = False) -> None:
    """The gateway with its HTTP and gRPC doors, its operator listener (and tenancy, and optionally a control
    plane) until SIGINT or SIGTERM; then `stop_doors` within settings.shutdown_timeout_s. `dev_tenant`: a local
    `herd serve` on the embedded database makes tenant `dev` on an empty database (herd.platform.tenancy.setup)."""
    from herd.platform.batch.setup import start_batches
    from herd.platform.gateway.cold_start import ColdStartPolicy
    from herd.platform.gateway.core import Gateway
    from herd.platform.gateway.grpc_server import start_grpc
    from herd.platform.gateway.health import BackendHealth
    from herd.platform.gateway.http_app import create_app
    from herd.platform.gateway.image_urls import ImageUrlPolicy
    from herd.platform.gateway.ops_app import create_ops_app
    from herd.platform.tenancy.admin_api import admin_router

    tenancy = _tenancy(settings, dev_tenant=dev_tenant)
    cold_start = {m.name: ColdStartPolicy(wait_s=m.cold_start_wait_s, retry_after_s=m.cold_start_retry_after_s)
                  for m in settings.models}
    images = settings.images
    gateway = Gateway(backends, guard=tenancy.guard if tenancy else None, request_timeout_s=settings.request_timeout_s,
                      cold_start=cold_start, log_prompts=settings.telemetry.log_prompts,
                      max_images_per_request=images.max_images_per_request, max_image_bytes=images.max_image_bytes,
                      migration_attempts=settings.migration_attempts)
    tls = settings.tls
    cert_chain, private_key, client_ca = (path.read_bytes() if path is not None else None
                                          for path in (tls.cert_file, tls.key_file, tls.client_ca_file))
    grpc_server, grpc_port = await start_grpc(gateway, host=settings.grpc_host, port=settings.grpc_port,
                                              cert_chain=cert_chain, private_key=private_key, client_ca=client_ca,
                                              limits=settings.limits)
    image_urls = ImageUrlPolicy(fetch_urls=images.fetch_urls, fetch_timeout_s=images.fetch_timeout_s,
                                max_bytes=images.max_image_bytes, allow_networks=images.fetch_allow_networks)
    health = BackendHealth(gateway)
    limits = settings.limits
    batch_apis = start_batches(settings.batch, tenancy.store, gateway) if tenancy else None  # needs the database
    app = create_app(gateway, max_request_body_bytes=settings.max_request_body_bytes,
                     read_timeout_s=limits.http_read_timeout_s, stream_write_timeout_s=limits.stream_write_timeout_s,
                     image_urls=image_urls, health=health, responses=_response_store(settings, tenancy),
                     batches=batch_apis.batches if batch_apis else None)
    routers = ([admin_router(tenancy.store, tenancy.admin_token, adapter_registry(settings, tenancy.store))]
               if tenancy else [])
    ops_app = create_ops_app(gateway, routers=routers, health=health,
                             max_request_body_bytes=settings.max_request_body_bytes)
    http, ops = _Uvicorn(http_config(app, settings)), _Uvicorn(ops_config(ops_app, settings))
    tasks = [asyncio.create_task(http.serve()), asyncio.create_task(ops.serve())]
    await _started(http, tasks[0])
    await _started(ops, tasks[1])
    stop = asyncio.Event()
    plane = control_plane(gateway)
    plane_task = asyncio.create_task(plane.run(stop)) if plane is not None else None
    if plane is not None:
        gateway.control_plane = plane
    _announce(settings, _port(http), grpc_port, tenancy, ops_port=_port(ops))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await stop_doors(settings, gateway, plane_task=plane_task, servers=(http, ops), server_tasks=tasks,
                     grpc_server=grpc_server, tenancy=tenancy, batch_runner=batch_apis.runner if batch_apis else None)


LEDGER_SHARE = 0.2  # of the shutdown budget, kept for writing the ledger (at most LEDGER_MAX_S)
LEDGER_MAX_S = 5.0
INTERRUPT_SHARE = 0.1  # of the budget, for interrupted requests to settle and their streams to end
INTERRUPT_MAX_S = 2.0


async def stop_doors(settings: HerdSettings, gateway: Any, *, plane_task: asyncio.Task[Any] | None,
                     servers: Sequence[uvicorn.Server], server_tasks: Sequence[asyncio.Task[None]],
                     grpc_server: Any, tenancy: Tenancy | None, batch_runner: Any = None) -> None:
    """Stop within settings.shutdown_timeout_s, so that a pod's SIGKILL after its grace period finds every
    usage row written: refuse new requests (503), stop the control plane and the listeners, let requests in
    flight finish for most of the budget, then interrupt the rest (each settled as `interrupted` with the
    tokens it streamed), and write the ledger in what is left (what the database does not take in time is
    in the usage journal, which the next start writes back)."""
    loop = asyncio.get_running_loop()
    budget_s = settings.shutdown_timeout_s
    deadline = loop.time() + budget_s
    ledger_s, interrupt_s = ledger_reserve_s(budget_s), min(INTERRUPT_MAX_S, INTERRUPT_SHARE * budget_s)

    def left(reserve_s: float = 0.0) -> float:
        return max(0.0, deadline - reserve_s - loop.time())

    log.info("stopping: new requests are refused; in-flight ones may finish within %g s", budget_s)
    gateway.begin_shutdown()
    for server in servers:
        server.should_exit = True  # stop accepting; connections end with their responses
    grpc_stop = asyncio.create_task(grpc_server.stop(grace=left(ledger_s)))  # stop accepting; cancels past grace
    if plane_task is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(plane_task, left(ledger_s + interrupt_s))
    if not await gateway.drain(left(ledger_s + interrupt_s)):
        log.warning("shutdown: %d requests still in flight; interrupting them", gateway.in_flight)
        gateway.interrupt()
        await gateway.drain(left(ledger_s))
    for pending in (grpc_stop, *server_tasks):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pending, left(ledger_s))
    if batch_runner is not None:  # its lines drained with the rest (new ones were refused: they stay pending)
        await batch_runner.stop()
    if tenancy is not None:
        try:
            await asyncio.wait_for(tenancy.ledger.close(), max(left(), 0.5))
        except TimeoutError:
            log.error("shutdown: the ledger was not written in time; its rows stay in the usage journal")
    flush_traces()


def ledger_reserve_s(budget_s: float) -> float:
    """What of a shutdown budget is kept for writing the ledger."""
    return min(LEDGER_MAX_S, LEDGER_SHARE * budget_s)


def door_grace_s(settings: HerdSettings) -> float:
    """How long uvicorn lets connections finish once told to exit, before it cancels their requests (each
    then settled for what it streamed): the shutdown budget less the ledger's share, so interrupted streams
    end on their own first."""
    budget_s = settings.shutdown_timeout_s
    return budget_s - ledger_reserve_s(budget_s)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, leaving SIGINT and SIGTERM to serve_doors (uvicorn's own handlers would stop only
    it, and put back the default handlers when it exits, so a second signal would kill the ledger's write)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    while not server.started:
        if task.done():
            task.result()  # why it stopped
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.05)


def _port(server: uvicorn.Server) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1])


def http_config(app: Any, settings: HerdSettings) -> uvicorn.Config:
    """uvicorn's config for the HTTP door: TLS when settings.tls has a certificate, and client certificates
    from tls.client_ca_file required when that is set; the door's limits (settings.limits): connections at
    once (503 beyond), keep-alive, request line and header size, the time headers may take, and the write
    deadline at the socket (h11 with DoorProtocol: httptools has no header size limit to set). Shutdown is bounded by
    settings.shutdown_timeout_s."""
    import ssl

    from herd.platform.gateway.door_protocol import DoorProtocol

    tls = settings.tls
    limits = settings.limits
    options: dict[str, Any] = {}
    if tls.public:
        options = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
        if tls.client_ca_file is not None:
            options |= {"ssl_ca_certs": str(tls.client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    protocol = DoorProtocol.with_limits(header_timeout_s=limits.http_read_timeout_s,
                                        write_timeout_s=limits.stream_write_timeout_s)
    return uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning",
                          log_config=None, lifespan="off", http=protocol,
                          limit_concurrency=limits.http_max_connections,
                          timeout_keep_alive=limits.http_keep_alive_timeout_s,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=limits.http_max_header_bytes,
                          timeout_graceful_shutdown=door_grace_s(settings), **options)  # type: ignore[arg-type]


def ops_config(app: Any, settings: HerdSettings) -> uvicorn.Config:
    """uvicorn's config for the operator listener: plain HTTP on settings.ops_host:ops_port (loopback by
    default; in Kubernetes a Service that only the cluster reaches)."""
    return uvicorn.Config(app, host=settings.ops_host, port=settings.ops_port, log_level="warning", log_config=None,
                          lifespan="off", timeout_graceful_shutdown=door_grace_s(settings))  # type: ignore[arg-type]


def _response_store(settings: HerdSettings, tenancy: Tenancy | None) -> Any:
    """The Responses API's store: in the tenancy database, or (no tenancy) in this process's memory."""
    from herd.platform.tenancy.responses import ResponseStore

    days = settings.responses.retention_days
    if tenancy is None:
        return ResponseStore.in_memory(retention_days=days)
    return ResponseStore(tenancy.store.engine, retention_days=days)


def _tenancy(settings: HerdSettings, *, dev_tenant: bool) -> Tenancy | None:
    if not settings.tenancy.auth:
        log.warning("AUTHENTICATION IS OFF (--no-auth): anyone who can reach the ports can use every model, "
                    "with no limits and no usage ledger. For local experiments only.")
        return None
    tenancy = start_tenancy(settings.tenancy, dev_tenant=dev_tenant, request_timeout_s=settings.request_timeout_s)
    tenancy.ledger.start()
    return tenancy


def _announce(settings: HerdSettings, http_port: int, grpc_port: int, tenancy: Tenancy | None, *,
              ops_port: int | None = None) -> None:
    """What serves where, on stdout. Every line goes through the log redaction (no key, no URL password); the
    one exception is the development key of a local first start (start_tenancy makes one only for a local
    `herd serve` on the embedded database, never on a configured one), shown once on purpose."""
    model = settings.models[0].name
    tls = settings.tls
    url = f"{'https' if tls.public else 'http'}://{settings.http_host}:{http_port}"
    ops = f"http://{settings.ops_host}:{settings.ops_port if ops_port is None else ops_port}"
    grpc_mode = ("TLS, client certificates required, " if tls.client_ca_file else "TLS, ") if tls.public else ""
    _say(f"herd is serving {[m.name for m in settings.models]}")
    _say(f"  OpenAI HTTP: {url}/v1   (OpenAPI: {url}/docs; {url}/health/ready)")
    _say(f"  gRPC herd.v1.Inference: {settings.grpc_host}:{grpc_port} ({grpc_mode}reflection on)")
    _say(f"  operators: {ops}/metrics, /health, /herd/load, /herd/stats" + (", /admin/v1" if tenancy else ""))
    if tls.public:
        clients = f"; clients need a certificate from {tls.client_ca_file}" if tls.client_ca_file else ""
        _say(f"  TLS on both doors with {tls.cert_file}{clients}")
    if tls.shards:
        _say(f"  expert shards: mutual TLS with {tls.shard_cert_file} (CA {tls.shard_ca_file})")
    auth = "--cert <client.crt> --key <client.key> " if tls.client_ca_file else ""
    if tenancy is None:
        _say("  WARNING: authentication is off (--no-auth)")
    else:
        _say(f"  tenants and usage: {redact_url(settings.tenancy.database_url)}; admin API {ops}/admin/v1 with the "
            f"token in {settings.tenancy.admin_token_file}")
        if tenancy.first_key and settings.tenancy.database_url == EMBEDDED_DATABASE_URL:
            # Deliberately unredacted: the local development key, made on this start and shown only now.
            print(f"  first start: tenant 'dev' made; its API key (shown once, keep it): "
                  f"export HERD_KEY={tenancy.first_key}", flush=True)
        auth += "-H \"Authorization: Bearer $HERD_KEY\" "
    _say("  try:")
    _say(f"    curl -s {url}/v1/chat/completions {auth}-H 'Content-Type: application/json' \\\n"
        f"      -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
        f"\"max_tokens\": 16}}'")
    _say("  Ctrl-C stops everything.")


def _say(line: str) -> None:
    """One line of the banner on stdout, redacted as a log line is."""
    print(redact(line), flush=True)


def redact_url(url: str) -> str:
    """A database or Redis URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<a URL that does not parse>"
