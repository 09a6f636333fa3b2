"""The control loop with fake load sources and actuators: it acts on changes, only as leader, never stalls
on a slow actuation, retries a failed one, exports its decisions; gateways' load adds up."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from herd.platform.controlplane.actuators import ReplicaStatus
from herd.platform.controlplane.loop import ControlPlane
from herd.platform.controlplane.metrics import GatewayLoadSource, HttpLoadSource, kv_use
from herd.platform.controlplane.policy import Fleet, ModelMetrics, ModelPolicy
from herd.platform.controlplane.units import pool
from herd.platform.gateway.load import LoadTracker
from tests.waiting import until


class FakeActuator:
    """Deployments by name (a colocated model's is named as the model); calls are (deployment, replicas)."""

    def __init__(self, models=("scout",)):
        self.targets = dict.fromkeys(models, 1)
        self.calls = []
        self.applications = {}  # deployment -> the application it was reached through

    def status(self, model, deployment=None):
        deployment = deployment or model
        self.applications[deployment] = model
        return ReplicaStatus(target=self.targets[deployment], ready=self.targets[deployment], starting=0)

    def scale(self, model, replicas, deployment=None):
        deployment = deployment or model
        assert self.applications.get(deployment, model) == model, "a deployment scaled through another application"
        self.calls.append((deployment, replicas))
        self.targets[deployment] = replicas


class FakeSource:
    def __init__(self):
        self.running = {}

    async def read(self):
        return {model: ModelMetrics(running=n) for model, n in self.running.items()}


def _sample(plane, name, **labels):
    return plane.metrics.registry.get_sample_value(name, labels)


def test_acts_on_changes_logs_reasons_exports_and_only_while_leading(caplog):
    source, actuator = FakeSource(), FakeActuator()
    now = [0.0]
    fleet = Fleet(policies={"scout": ModelPolicy(min_replicas=1, max_replicas=4, scale_down_window_s=30)})
    leading = [True]
    plane = ControlPlane(source, actuator, fleet, leader=lambda: leading[0], clock=lambda: now[0])
    caplog.set_level("INFO", logger="herd.controlplane")

    async def rounds(loads):
        for load in loads:
            source.running["scout"] = load
            await plane.tick()
            await plane.settle()
            now[0] += 10

    asyncio.run(rounds([0, 100, 100, 0, 0, 0, 0, 0]))
    assert actuator.calls == [("scout", 4), ("scout", 1)]
    assert any("scaling scout 1 -> 4" in r.getMessage() and "requests" in r.getMessage() for r in caplog.records)
    assert _sample(plane, "herd_controlplane_decisions_total", model="scout", direction="up") == 1
    assert _sample(plane, "herd_controlplane_decisions_total", model="scout", direction="down") == 1
    assert _sample(plane, "herd_controlplane_decisions_total", model="scout", direction="hold") == 6
    assert _sample(plane, "herd_controlplane_target_replicas", model="scout") == 1
    assert _sample(plane, "herd_controlplane_leader") == 1
    leading[0] = False
    asyncio.run(rounds([100, 100]))
    assert actuator.calls == [("scout", 4), ("scout", 1)], "a follower never acts"
    assert _sample(plane, "herd_controlplane_leader") == 0


def test_a_slow_scale_up_does_not_stall_the_other_models_and_the_latest_target_wins():
    release = threading.Event()

    class SlowScout(FakeActuator):
        def scale(self, model, replicas, deployment=None):
            if model == "scout" and not self.calls:
                assert release.wait(10), "never released"  # a cold start under way
            super().scale(model, replicas, deployment)

    source, actuator = FakeSource(), SlowScout(models=("scout", "maverick"))
    policy = ModelPolicy(min_replicas=1, max_replicas=8, target_requests_per_replica=10, scale_down_window_s=0)
    now = iter(range(0, 1000, 10))
    plane = ControlPlane(source, actuator, Fleet(policies={"scout": policy, "maverick": policy}),
                         clock=lambda: float(next(now)))

    async def main():
        source.running = {"scout": 30, "maverick": 0}
        await plane.tick()  # scout 1 -> 3 starts and blocks
        source.running = {"scout": 50, "maverick": 20}
        await plane.tick()  # maverick 1 -> 2 goes ahead; scout's new target waits for its change
        assert plane.acting("maverick"), "maverick's change started while scout's is blocked"
        assert await until(lambda: not plane.acting("maverick")), "maverick's change never finished"
        calls_while_blocked = list(actuator.calls)
        acting = plane.acting("scout")
        release.set()
        await plane.settle()
        await plane.tick()  # the round after scout's change applies its latest target
        await plane.settle()
        return calls_while_blocked, acting

    blocked, acting = asyncio.run(main())
    assert acting and blocked == [("maverick", 2)]
    assert actuator.calls == [("maverick", 2), ("scout", 3), ("scout", 5)]


def test_a_failed_scale_is_counted_and_retried_next_round():
    class Flaky(FakeActuator):
        failures = 1

        def scale(self, model, replicas, deployment=None):
            if self.failures:
                self.failures -= 1
                raise RuntimeError("API server unavailable")
            super().scale(model, replicas, deployment)

    source, actuator = FakeSource(), Flaky()
    plane = ControlPlane(source, actuator, Fleet(policies={"scout": ModelPolicy(max_replicas=4)}), clock=lambda: 0.0)

    async def main():
        source.running["scout"] = 100
        for _ in range(2):
            await plane.tick()
            await plane.settle()

    asyncio.run(main())
    assert actuator.calls == [("scout", 4)]
    assert _sample(plane, "herd_controlplane_failures_total", stage="scale") == 1


def test_load_from_several_gateways_adds_up_and_a_silent_one_is_skipped():
    answers = {
        "http://gw-a": {"scout": {"in_flight": 5, "in_flight_tokens": 900, "waiting_for_replica": 2,
                                  "awaiting_first_token": 3, "refused_cold": 1, "ttft_p95_s": 0.8,
                                  "itl_p95_s": 0.04, "output_tokens_per_s": 40.0}},
        "http://gw-b": {"scout": {"in_flight": 3, "in_flight_tokens": 100, "waiting_for_replica": 0,
                                  "refused_cold": 0, "ttft_p95_s": 2.5, "output_tokens_per_s": 10.0}},
        "http://gw-d": {"scout": {"in_flight": 1, "in_flight_tokens": 10, "waiting_for_replica": 0,
                                  "awaiting_first_token": 1, "refused_cold": 0, "ttft_p95_s": None,
                                  "itl_p95_s": 0.09, "output_tokens_per_s": 0.0}},
    }

    def handler(request):
        base = f"{request.url.scheme}://{request.url.host}"
        if base not in answers:
            return httpx.Response(503)
        assert request.url.path == "/herd/load"
        return httpx.Response(200, json=answers[base])

    source = HttpLoadSource(["http://gw-a", "http://gw-b/", "http://gw-c", "http://gw-d"],
                            transport=httpx.MockTransport(handler))
    scout = asyncio.run(source.read())["scout"]
    assert (scout.running, scout.queued, scout.in_flight_tokens, scout.refused_cold) == (7, 2, 1010, 1)
    assert scout.ttft_p95_s == 2.5 and scout.output_tokens_per_s == 50.0
    assert scout.awaiting_first_token == 4, "summed (a gateway of an older version reports none)"
    assert scout.itl_p95_s == 0.09, "the worst gateway's"


def test_a_headless_service_is_resolved_to_every_gateway_pod_each_round():
    pods = {"10.0.0.5": 4, "10.0.0.6": 3, "fd00::7": 1}
    resolved = [list(pods)]

    async def lookup(host, port):
        assert (host, port) == ("herd-gateway-pods.herd.svc", 8000)
        return resolved[0]

    def handler(request):
        host = request.url.host
        return httpx.Response(200, json={"scout": {"in_flight": pods[host], "in_flight_tokens": 0,
                                                   "waiting_for_replica": 0, "refused_cold": 0, "ttft_p95_s": None,
                                                   "output_tokens_per_s": 0.0}})

    source = HttpLoadSource(["http://herd-gateway-pods.herd.svc:8000"], resolve=True, lookup=lookup,
                            transport=httpx.MockTransport(handler))
    assert asyncio.run(source.read())["scout"].running == 8
    resolved[0] = ["10.0.0.5"]  # the HPA took two gateways away
    assert asyncio.run(source.read())["scout"].running == 4
    assert asyncio.run(HttpLoadSource(["http://10.0.0.6:8000"], transport=httpx.MockTransport(handler))
                       .read())["scout"].running == 3, "without resolve the URL is asked as it is"


def test_report_says_each_models_replicas_and_last_decision():
    """What /herd/controlplane shows, from the plane's own report (the HTTP door reads nothing else of it)."""
    source, actuator = FakeSource(), FakeActuator(models=("scout", "maverick"))
    fleet = Fleet(policies={"scout": ModelPolicy(min_replicas=1, max_replicas=4),
                            "maverick": ModelPolicy(min_replicas=1, max_replicas=2)})
    plane = ControlPlane(source, actuator, fleet, clock=lambda: 0.0)

    async def round_and_report():
        source.running["scout"] = 100
        await plane.tick()
        await plane.settle()
        return await plane.report()

    report = asyncio.run(round_and_report())
    assert report["enabled"] is True
    assert report["replicas"]["scout"] == {"target": 4, "ready": 4, "starting": 0, "acting": False}
    assert report["replicas"]["maverick"]["target"] == 1
    scout = report["decisions"]["scout"]
    assert (scout["previous"], scout["target"]) == (1, 4) and "requests" in scout["reason"]
    assert plane.registry is plane.metrics.registry


class PoolSource:
    """One disaggregated model's load, as the gateway sees it."""

    def __init__(self):
        self.load = ModelMetrics()

    async def read(self):
        return {"scout": self.load}


def test_a_disaggregated_models_pools_are_scaled_each_on_its_own_signal_and_shown_apart():
    actuator = FakeActuator(models=("scout-prefill", "scout-decode"))
    prefill, decode = pool("scout", "prefill"), pool("scout", "decode")
    fleet = Fleet(policies={
        prefill.name: ModelPolicy(min_replicas=1, max_replicas=4, target_requests_per_replica=4, ttft_slo_s=1.0),
        decode.name: ModelPolicy(min_replicas=1, max_replicas=4, ttft_slo_s=None, itl_slo_s=0.05,
                                 kv_use_high_water=0.9, scale_down_window_s=0)})
    source = PoolSource()
    now = iter(range(0, 1000, 10))
    plane = ControlPlane(source, actuator, fleet, units={prefill.name: prefill, decode.name: decode},
                         clock=lambda: float(next(now)))

    async def round_with(load):
        source.load = load
        await plane.tick()
        await plane.settle()
        return await plane.report()

    asyncio.run(round_with(ModelMetrics(running=4, awaiting_first_token=12, ttft_p95_s=3.0)))
    assert actuator.calls == [("scout-prefill", 3)], "12 waiting for their first token / 4; TTFT is not decode's"
    assert actuator.applications == {"scout-prefill": "scout", "scout-decode": "scout"}, "both in scout's application"
    report = asyncio.run(round_with(ModelMetrics(running=4, awaiting_first_token=12, kv_use=0.95)))
    assert actuator.calls[1:] == [("scout-decode", 2)], "KV use scales the decode pool"
    assert report["replicas"]["scout-decode"] == {"target": 2, "ready": 2, "starting": 0, "acting": False,
                                                  "model": "scout", "pool": "decode"}
    decision = report["decisions"]["scout-decode"]
    assert (decision["model"], decision["pool"]) == ("scout", "decode") and "KV use 95%" in decision["reason"]
    assert _sample(plane, "herd_controlplane_target_replicas", model="scout-prefill") == 3
    assert _sample(plane, "herd_controlplane_target_replicas", model="scout-decode") == 2
    assert _sample(plane, "herd_controlplane_decisions_total", model="scout-decode", direction="up") == 1


def test_units_must_match_the_policies():
    with pytest.raises(ValueError, match="differ"):
        ControlPlane(FakeSource(), FakeActuator(), Fleet(policies={"scout": ModelPolicy()}),
                     units={"scout-decode": pool("scout", "decode")})


class FakeBackend:
    def __init__(self, stats):
        self._stats = stats

    async def stats(self):
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats


class FakeGateway:
    def __init__(self, backends):
        self.backends = backends
        self.load = LoadTracker()
        for model in backends:
            self.load.started(model, 10)


def test_the_local_source_reads_the_kv_use_of_the_models_that_scale_on_it():
    gateway = FakeGateway({
        "scout": FakeBackend({"kv_blocks_used_full": 90, "kv_blocks_total_full": 100, "kv_blocks_used_chunked": 1,
                              "kv_blocks_total_chunked": 50, "prefill_kv_blocks_used_full": 100,
                              "prefill_kv_blocks_total_full": 100}),
        "maverick": FakeBackend({"kv_blocks_used_full": 100, "kv_blocks_total_full": 100}),
        "gone": FakeBackend(RuntimeError("replica unavailable")),
    })
    loads = asyncio.run(GatewayLoadSource(gateway, kv_models=["scout", "gone"]).read())
    assert loads["scout"].kv_use == 0.9, "the fullest group of the decode replica's (not the prefill one's)"
    assert loads["scout"].running == 1
    assert loads["gone"].kv_use is None, "a replica that does not answer: no KV signal this round"
    assert loads["maverick"].kv_use is None, "not read for a model whose policy does not use it"
    assert kv_use({"kv_blocks_held": 0}) is None
