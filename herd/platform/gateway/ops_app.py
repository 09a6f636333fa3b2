"""The operator listener (settings.ops_host:ops_port, never the public port): /metrics, /herd/stats,
/herd/load, /herd/controlplane, /health and the admin API under /admin/v1.

These say what every tenant does (metrics carry tenant ids and volumes), ask Ray (health, stats), or change
tenants (admin): they belong on a port that only the cluster's own scrapers and operators reach. The public
door keeps only /health/live and /health/ready.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from herd import __version__
from herd.platform.gateway.body_limit import BodyLimitMiddleware
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.health import BackendHealth
from herd.platform.gateway.http_app import MAX_REQUEST_BODY_BYTES, document_as_served, install_error_handlers
from herd.platform.gateway.openai_models import ErrorResponse
from herd.workers import router_metrics

_ROUTER_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "invalid request"), (401, "credential required"), (404, "not found"),
                       (409, "exists already"), (413, "request body over the limit"))}


def create_ops_app(gateway: Gateway, *, routers: Sequence[APIRouter] = (), health: BackendHealth | None = None,
                   max_request_body_bytes: int = MAX_REQUEST_BODY_BYTES) -> FastAPI:
    """The operator endpoints of `gateway`; `routers` adds more (the admin API) under the same error handling
    and body limit. `health` is the cache the public /health/ready reads: /health checks now and refreshes it."""
    health = health or BackendHealth(gateway)
    app = FastAPI(title="Herd operator API", version=__version__,
                  description="Metrics, load, stats, health and the admin API of one Herd gateway.")
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_request_body_bytes)
    install_error_handlers(app)
    for router in routers:
        app.include_router(router, responses=_ROUTER_ERRORS)
    document_as_served(app)

    @app.get("/health", responses={503: {"description": "a model is not healthy"}})
    async def health_now() -> JSONResponse:
        """Every model's backend, asked now."""
        states = await health.check()
        return JSONResponse({"models": states}, status_code=200 if all(states.values()) else 503)

    @app.get("/herd/stats")
    async def stats() -> dict[str, dict[str, int]]:
        """What each model's replica holds now (requests, KV blocks in use): for operators and tests."""
        return {name: await b.stats() for name, b in gateway.backends.items()}

    @app.get("/herd/controlplane")
    async def controlplane() -> dict[str, Any]:
        """The last decision per model, with its reason, when this process runs the control plane."""
        plane = gateway.control_plane
        return {"enabled": False} if plane is None else await plane.report()

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text exposition: the gateway's requests and load, its handles' request routing, and the
        control plane's numbers when this process runs it (docs/METRICS.md)."""
        plane = gateway.control_plane
        text = generate_latest(gateway.telemetry.metrics.registry) + generate_latest(router_metrics.REGISTRY)
        if plane is not None:
            text += generate_latest(plane.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/herd/load")
    async def load() -> dict[str, dict[str, float | None]]:
        """Per-model load over the last minute as this gateway saw it (the control plane reads it)."""
        return gateway.load.snapshot()

    return app
