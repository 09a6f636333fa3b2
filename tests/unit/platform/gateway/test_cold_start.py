"""A model with no ready replica (scaled to zero): requests are held for one, counted as demand, and
answered 503 + Retry-After when none comes in time; the server keeps serving."""

from __future__ import annotations

import asyncio

import httpx

from herd.platform.controlplane.metrics import from_load
from herd.platform.controlplane.policy import Fleet, ModelPolicy, ModelState, decide
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.cold_start import ColdStartPolicy
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from herd.workers.serve_details import replica_counts, target_replicas

CHAT = {"model": "scout", "messages": [{"role": "user", "content": "wake up"}], "max_tokens": 4, "temperature": 0}


class ColdBackend(LocalBackend):
    """The in-process replica, reporting no ready replica for its first `cold_polls` asks."""

    def __init__(self, core, cold_polls, on_poll=None):
        super().__init__(core)
        self.cold_polls, self.polls, self.on_poll = cold_polls, 0, on_poll

    async def ready_replicas(self):
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll()
        return 0 if self.polls <= self.cold_polls else 1


def _post(gateway, body=CHAT):
    async def main():
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://herd") as client:
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.run(main())


def test_a_request_is_held_until_a_replica_is_ready_and_counts_as_queued_meanwhile(core):
    seen = []
    backend = ColdBackend(core, cold_polls=3, on_poll=lambda: seen.append(gateway.load.snapshot()["scout"]))
    gateway = Gateway({"scout": backend}, cold_start={"scout": ColdStartPolicy(wait_s=30, poll_s=0.01)})
    reply = _post(gateway)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4
    assert backend.polls == 4, "asked until the fourth answer said one was ready"
    held = seen[1]
    assert held["in_flight"] == 1 and held["waiting_for_replica"] == 1 and held["awaiting_first_token"] == 1
    assert held["in_flight_tokens"] == reply.json()["usage"]["prompt_tokens"] + 4, "prompt + max_tokens reserved"
    metrics = from_load({"scout": held})["scout"]
    assert (metrics.running, metrics.queued) == (0, 1), "held for a replica is queued, not running"
    after = gateway.load.snapshot()["scout"]
    assert (after["in_flight"], after["in_flight_tokens"], after["waiting_for_replica"]) == (0, 0, 0)
    assert after["awaiting_first_token"] == 0, "its first token came"


def test_when_no_replica_comes_in_time_it_is_503_with_retry_after_and_still_demand(core):
    backend = ColdBackend(core, cold_polls=10**9)
    policy = ColdStartPolicy(wait_s=0.05, retry_after_s=45, poll_s=0.01)
    gateway = Gateway({"scout": backend}, cold_start={"scout": policy})
    reply = _post(gateway)
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "45"
    error = reply.json()["error"]
    assert error["code"] == "model_starting" and "scaled to zero" in error["message"]
    load = gateway.load.snapshot()["scout"]
    assert (load["in_flight"], load["waiting_for_replica"], load["refused_cold"]) == (0, 0, 1)
    assert load["awaiting_first_token"] == 0, "a request that ended with no token no longer waits for one"
    # The control plane, reading that, brings a model at zero back to one replica.
    fleet = Fleet(policies={"scout": ModelPolicy(min_replicas=0, max_replicas=2)})
    decisions, _ = decide(from_load({"scout": load}), {"scout": ModelState(target=0, last_busy=0.0)}, 5000.0, fleet)
    assert decisions["scout"].target == 1 and "refused for want of a replica" in decisions["scout"].reason
    backend.cold_polls = 0
    assert _post(gateway).status_code == 200, "and the gateway serves once the replica is there"


def test_a_backend_that_cannot_tell_is_never_held(core):
    class Unknown(LocalBackend):
        async def ready_replicas(self):
            return None

    gateway = Gateway({"scout": Unknown(core)}, cold_start={"scout": ColdStartPolicy(wait_s=0)})
    assert _post(gateway).status_code == 200


def test_replicas_from_the_ray_dashboard_details():
    details = {"applications": {"scout": {"deployments": {"scout": {"target_num_replicas": 3, "replicas": [
        {"state": "RUNNING"}, {"state": "STARTING"}, {"state": "RUNNING"}, {"state": "STOPPING"}]}}}}}
    assert replica_counts(details, "scout") == {"RUNNING": 2, "STARTING": 1, "STOPPING": 1}
    assert target_replicas(details, "scout") == 3
    assert replica_counts(details, "maverick") == {} and target_replicas(details, "maverick") is None
