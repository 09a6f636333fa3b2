"""Operator endpoints live on their own listener (ops_app); the public door keeps only cheap liveness and
readiness, and readiness reads a cached health check instead of asking the backends per probe."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from herd.platform.gateway.core import Gateway
from herd.platform.gateway.health import BackendHealth
from herd.platform.gateway.http_app import create_app
from herd.platform.gateway.ops_app import create_ops_app
from herd.platform.tenancy.admin_api import admin_router
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.store import TenantStore

OPERATOR_PATHS = ("/metrics", "/herd/stats", "/herd/load", "/herd/controlplane", "/health", "/admin/v1/tenants")


class CountedBackend:
    """A backend whose health is set by the test and whose health checks are counted."""

    def __init__(self, inner):
        self.inner, self.name, self.tokenizer = inner, inner.name, inner.tokenizer
        self.ok, self.checks = True, 0

    def card(self):
        return self.inner.card()

    def generate(self, request):
        return self.inner.generate(request)

    async def stats(self):
        return await self.inner.stats()

    async def healthy(self):
        self.checks += 1
        return self.ok

    async def ready_replicas(self):
        return 1


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd")


@pytest.fixture
def store(tmp_path):
    store = TenantStore(connect(f"sqlite:///{tmp_path / 'herd.db'}"))
    migrate(store.engine)
    return store


def test_operator_endpoints_are_not_on_the_public_door_and_are_on_the_operator_one(gateway, store):
    token = "a" * 40

    async def main():
        async with _client(create_app(gateway)) as public, \
                _client(create_ops_app(gateway, routers=[admin_router(store, token)])) as ops:
            hidden = {p: (await public.get(p)).status_code for p in OPERATOR_PATHS}
            shown = {p: (await ops.get(p, headers={"authorization": f"Bearer {token}"})).status_code
                     for p in OPERATOR_PATHS}
            metrics = (await ops.get("/metrics")).text
            load = (await ops.get("/herd/load")).json()
            return hidden, shown, metrics, load

    hidden, shown, metrics, load = asyncio.run(main())
    assert set(hidden.values()) == {404}, hidden
    assert set(shown.values()) == {200}, shown
    assert "herd_requests_in_flight" in metrics
    assert "# TYPE herd_router_prefix_hits_total counter" in metrics, "the handles' routers, beside the gateway's"
    assert isinstance(load, dict)


def test_the_public_document_names_no_operator_endpoint(gateway):
    paths = set(create_app(gateway).openapi()["paths"])
    assert {"/health/live", "/health/ready", "/v1/models", "/v1/chat/completions", "/v1/completions"} <= paths
    # Every door's API is under /v1 (each door adds its own routes); nothing else but the probes.
    assert {p for p in paths if not p.startswith("/v1/")} == {"/health/live", "/health/ready"}, paths
    assert not {p for p in paths if p.startswith(("/admin", "/herd", "/metrics"))}


def test_readiness_reads_a_cached_health_check_and_says_503_when_shutting_down_or_unhealthy(core):
    from herd.platform.gateway.backend import LocalBackend

    backend = CountedBackend(LocalBackend(core))
    gateway = Gateway({"scout": backend})
    health = BackendHealth(gateway, max_age_s=3600)
    app, ops = create_app(gateway, health=health), create_ops_app(gateway, health=health)

    async def main():
        async with _client(app) as public, _client(ops) as operator:
            probes = [(await public.get("/health/ready")).status_code for _ in range(20)]
            checks_after_probes = backend.checks
            backend.ok = False
            still_cached = (await public.get("/health/ready")).status_code
            checked_now = (await operator.get("/health")).status_code  # asks now, and refreshes the cache
            after_check = (await public.get("/health/ready")).status_code
            backend.ok = True
            await operator.get("/health")
            gateway.begin_shutdown()
            closing = await public.get("/health/ready")
            live = (await public.get("/health/live")).status_code
            return probes, checks_after_probes, still_cached, checked_now, after_check, closing, live

    probes, checks, still_cached, checked_now, after_check, closing, live = asyncio.run(main())
    assert probes == [200] * 20 and checks == 1, "twenty probes must not be twenty backend calls"
    assert still_cached == 200 and checked_now == 503 and after_check == 503
    assert closing.status_code == 503 and closing.json()["reason"] == "shutting down"
    assert live == 200


def test_a_health_check_that_hangs_or_fails_is_unhealthy_not_a_hung_probe(core):
    from herd.platform.gateway.backend import LocalBackend

    class Hanging(CountedBackend):
        async def healthy(self):
            await asyncio.Event().wait()

    class Failing(CountedBackend):
        async def healthy(self):
            raise RuntimeError("Ray is gone")

    local = LocalBackend(core)
    gateway = Gateway({"hangs": Hanging(local), "fails": Failing(local)})
    assert asyncio.run(BackendHealth(gateway, timeout_s=0.05).states()) == {"hangs": False, "fails": False}


def test_the_admin_api_on_the_operator_port_keeps_its_credential_and_openai_errors(gateway, store):
    token = "t" * 40

    async def main():
        async with _client(create_ops_app(gateway, routers=[admin_router(store, token)])) as ops:
            return (await ops.get("/admin/v1/tenants"),
                    await ops.post("/admin/v1/tenants", json={"id": "x", "surprise": 1},
                                   headers={"authorization": f"Bearer {token}"}))

    unauthenticated, invalid = asyncio.run(main())
    assert unauthenticated.status_code == 401
    assert invalid.status_code == 400 and set(invalid.json()["error"]) == {"message", "type", "param", "code"}


def test_a_replicas_stats_carry_each_groups_blocks_the_control_plane_reads_as_kv_use(gateway):
    from herd.platform.controlplane.metrics import kv_use

    stats = asyncio.run(gateway.backends["scout"].stats())
    groups = {key.removeprefix("kv_blocks_total_") for key in stats if key.startswith("kv_blocks_total_")}
    assert groups and groups == {key.removeprefix("kv_blocks_used_") for key in stats
                                 if key.startswith("kv_blocks_used_")}
    assert all(stats[f"kv_blocks_total_{g}"] > 0 for g in groups)
    assert kv_use(stats) == 0.0, "an idle replica holds no block"
