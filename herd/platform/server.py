"""`herd serve`: a local Ray cluster, one Serve application per model, and the gateway's two doors.

Ctrl-C (or SIGTERM) stops it in order: the doors stop accepting, in-flight requests drain (Serve
drains its replicas), then Ray goes down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from herd.model.tiny import make_tiny
from herd.platform.settings import PRESETS, HerdSettings, ModelSettings
from herd.platform.telemetry.tracing import flush_traces
from herd.platform.tenancy.setup import Tenancy, start_tenancy
from herd.workers.replica_config import ReplicaArgs
from herd.workers.shard_tls import ShardTls

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("herd.serve")

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
    needed = sum((1 + m.shard_processes) * max(m.deployment.num_replicas, m.autoscale.max_replicas)
                 for m in settings.models)
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
                     model.shards, model.transport)
            serve.run(build_app(apps[model.name]), name=model.name, route_prefix=None, external_scaler_enabled=scaled)
        backends = {m.name: await ServeBackend.connect(m.name) for m in settings.models}

        def control_plane(gateway: Any) -> Any:
            if not scaled:
                return None
            from herd.platform.controlplane.app import local_control_plane

            if not context.dashboard_url:
                raise RuntimeError("the control plane needs the Ray dashboard, and this Ray cluster has none")
            return local_control_plane(settings, gateway, context.dashboard_url)

        await serve_doors(settings, backends, control_plane)
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


async def serve_doors(settings: HerdSettings, backends: dict[str, Any], control_plane: Any) -> None:
    """The gateway with its HTTP and gRPC doors (and tenancy, and optionally a control plane) until a
    signal; then stop admitting, drain, write the ledger."""
    import uvicorn

    from herd.platform.gateway.cold_start import ColdStartPolicy
    from herd.platform.gateway.core import Gateway
    from herd.platform.gateway.grpc_server import start_grpc
    from herd.platform.gateway.http_app import create_app
    from herd.platform.gateway.image_urls import ImageUrlPolicy
    from herd.platform.tenancy.admin_api import admin_router

    tenancy = _tenancy(settings)
    cold_start = {m.name: ColdStartPolicy(wait_s=m.cold_start_wait_s, retry_after_s=m.cold_start_retry_after_s)
                  for m in settings.models}
    gateway = Gateway(backends, guard=tenancy.guard if tenancy else None, request_timeout_s=settings.request_timeout_s,
                      cold_start=cold_start, log_prompts=settings.telemetry.log_prompts,
                      max_images_per_request=settings.images.max_images_per_request)
    routers = [admin_router(tenancy.store, tenancy.admin_token)] if tenancy else []
    tls = settings.tls
    pem = {name: path.read_bytes() for name, path in (("cert_chain", tls.cert_file), ("private_key", tls.key_file),
                                                      ("client_ca", tls.client_ca_file)) if path is not None}
    grpc_server, grpc_port = await start_grpc(gateway, host=settings.grpc_host, port=settings.grpc_port, **pem)
    images = settings.images
    image_urls = ImageUrlPolicy(fetch_urls=images.fetch_urls, fetch_timeout_s=images.fetch_timeout_s,
                                max_bytes=images.max_image_bytes)
    app = create_app(gateway, routers=routers, max_request_body_bytes=settings.max_request_body_bytes,
                     image_urls=image_urls)
    http = uvicorn.Server(http_config(app, settings))
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            http_task.result()
        await asyncio.sleep(0.05)
    stop = asyncio.Event()
    plane = control_plane(gateway)
    plane_task = asyncio.create_task(plane.run(stop)) if plane is not None else None
    if plane is not None:
        gateway.control_plane = plane
    _announce(settings, http.servers[0].sockets[0].getsockname()[1], grpc_port, tenancy)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: no new requests; draining in-flight ones")
    if plane_task is not None:
        await plane_task
    http.should_exit = True
    await grpc_server.stop(grace=max(m.drain_timeout_s for m in settings.models))
    await http_task
    if tenancy is not None:
        await tenancy.ledger.close()  # every usage row written (or spilled) before exit
    flush_traces()


def http_config(app: Any, settings: HerdSettings) -> uvicorn.Config:
    """uvicorn's config for the HTTP door: TLS when settings.tls has a certificate, and client certificates
    from tls.client_ca_file required when that is set."""
    import ssl

    import uvicorn

    tls = settings.tls
    options: dict[str, Any] = {}
    if tls.public:
        options = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
        if tls.client_ca_file is not None:
            options |= {"ssl_ca_certs": str(tls.client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="warning",
                          lifespan="off", **options)


def _tenancy(settings: HerdSettings) -> Tenancy | None:
    if not settings.tenancy.auth:
        log.warning("AUTHENTICATION IS OFF (--no-auth): anyone who can reach the ports can use every model, "
                    "with no limits and no usage ledger. For local experiments only.")
        return None
    tenancy = start_tenancy(settings.tenancy)
    tenancy.ledger.start()
    return tenancy


def _announce(settings: HerdSettings, http_port: int, grpc_port: int, tenancy: Tenancy | None) -> None:
    model = settings.models[0].name
    tls = settings.tls
    url = f"{'https' if tls.public else 'http'}://{settings.http_host}:{http_port}"
    grpc_mode = ("TLS, client certificates required, " if tls.client_ca_file else "TLS, ") if tls.public else ""
    print(f"herd is serving {[m.name for m in settings.models]}", flush=True)
    print(f"  OpenAI HTTP: {url}/v1   (OpenAPI: {url}/docs)", flush=True)
    print(f"  gRPC herd.v1.Inference: {settings.grpc_host}:{grpc_port} ({grpc_mode}reflection on)", flush=True)
    if tls.public:
        clients = f"; clients need a certificate from {tls.client_ca_file}" if tls.client_ca_file else ""
        print(f"  TLS on both doors with {tls.cert_file}{clients}", flush=True)
    if tls.shards:
        print(f"  expert shards: mutual TLS with {tls.shard_cert_file} (CA {tls.shard_ca_file})", flush=True)
    auth = "--cert <client.crt> --key <client.key> " if tls.client_ca_file else ""
    if tenancy is None:
        print("  WARNING: authentication is off (--no-auth)", flush=True)
    else:
        print(f"  tenants and usage: {settings.tenancy.database_url}; admin API {url}/admin/v1 with the token in "
              f"{settings.tenancy.admin_token_file}", flush=True)
        if tenancy.first_key:
            print(f"  first start: tenant 'dev' made; its API key (shown once, keep it): {tenancy.first_key}",
                  flush=True)
        key = tenancy.first_key or "<your API key>"
        auth += f"-H 'Authorization: Bearer {key}' "
    print("  try:", flush=True)
    print(f"    curl -s {url}/v1/chat/completions {auth}-H 'Content-Type: application/json' \\\n"
          f"      -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
          f"\"max_tokens\": 16}}'", flush=True)
    print("  Ctrl-C stops everything.", flush=True)
