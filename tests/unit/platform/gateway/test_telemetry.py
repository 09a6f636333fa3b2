"""Telemetry of a request through the gateway and an in-process replica: its trace (from the caller's
traceparent down to every expert dispatch), the gateway's and the replica's Prometheus metrics, and
the logs (ids in every line, no prompt or key)."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from herd.engine import EngineConfig
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from herd.platform.gateway.ops_app import create_ops_app
from herd.platform.settings import TelemetrySettings
from herd.platform.telemetry.logs import configure_logging
from herd.platform.telemetry.tracing import MEMORY, configure_tracing
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import InProcessRateLimiter
from herd.platform.tenancy.store import TenantStore
from herd.workers.expert_shard import serve as serve_shard
from herd.workers.grpc_transport import GrpcTransport
from herd.workers.placement import place_experts
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


@pytest.fixture
def spans():
    configure_tracing(TelemetrySettings(traces="memory"), "test")
    MEMORY.clear()
    yield MEMORY
    MEMORY.clear()


def _http(gateway):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://herd")


async def _metrics(gateway) -> str:
    """/metrics, from the operator listener."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_ops_app(gateway)),
                                 base_url="http://herd-ops") as ops:
        return (await ops.get("/metrics")).text


def _chat(content="Tell me about the herd.", model="scout", **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0,
            **extra}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_request_is_one_trace_from_the_callers_traceparent_to_the_engine_phases(gateway, spans):
    async def main():
        async with _http(gateway) as http:
            return await http.post("/v1/chat/completions", json=_chat(), headers={"traceparent": TRACEPARENT})

    response = asyncio.run(main())
    assert response.status_code == 200
    by_name = {s.name: s for s in spans.get_finished_spans()}
    request = by_name["herd.request scout"]
    assert format(request.context.trace_id, "032x") == TRACE_ID, "the caller's trace is continued"
    parents = {s.context.span_id: s.parent for s in spans.get_finished_spans()}
    parent = request.parent  # the caller's span, or FastAPI's HTTP server span under it
    while parent is not None and parent.span_id in parents:
        parent = parents[parent.span_id]
    assert parent is not None and format(parent.span_id, "016x") == PARENT_SPAN
    usage = response.json()["usage"]
    assert request.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert request.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert request.attributes["herd.tenant"] == "default" and request.attributes["herd.status"] == "ok"
    assert "herd.prompt" not in request.attributes, "prompt text only when log_prompts is on"
    replica = by_name["herd.replica.generate"]
    assert by_name["herd.gateway.admit"].parent.span_id == request.context.span_id
    assert replica.parent.span_id == request.context.span_id, "through the GenerateRequest's trace_context"
    phases = [by_name[f"herd.engine.{p}"] for p in ("queue", "prefill", "decode")]
    assert all(p.parent.span_id == replica.context.span_id for p in phases)
    assert all(p.context.trace_id == request.context.trace_id for p in (replica, *phases))
    assert phases[0].end_time <= phases[1].start_time <= phases[1].end_time <= phases[2].start_time
    assert request.start_time <= replica.start_time and replica.end_time <= request.end_time


def test_without_a_traceparent_the_gateway_starts_a_trace_and_errors_are_marked(gateway, spans):
    async def main():
        async with _http(gateway) as http:
            ok = await http.post("/v1/chat/completions", json=_chat())
            too_long = await http.post("/v1/chat/completions", json=_chat(max_tokens=10**6))
            return ok, too_long

    ok, too_long = asyncio.run(main())
    assert ok.status_code == 200 and too_long.status_code == 400
    (request,) = [s for s in spans.get_finished_spans() if s.name == "herd.request scout"]  # 400: never admitted
    assert request.context.trace_flags.sampled
    in_trace = [s for s in spans.get_finished_spans() if s.context.trace_id == request.context.trace_id]
    assert len([s for s in in_trace if s.parent is None]) == 1, "one trace, started here (FastAPI's HTTP span "
    "when it traces, else the gateway's): never a second one for the same request"
    assert {"herd.request scout", "herd.replica.generate", "herd.engine.decode"} <= {s.name for s in in_trace}


@pytest.fixture
def sharded_core(tiny_path):
    """The tiny Scout with two expert shards over real gRPC (in this process) and every step traced."""
    placement = place_experts(16, 2)
    servers = [serve_shard(tiny_path, list(experts)) for experts in placement.shard_experts]
    addresses = [f"127.0.0.1:{port}" for _, port, _ in servers]
    config = ReplicaConfig(name="scout", path=str(tiny_path), shards=2, transport="grpc",
                           engine=EngineConfig(kv_cache_mb=8, max_num_seqs=4, max_model_len=256))
    core = ReplicaCore(config, lambda shard_experts: GrpcTransport(addresses, timeout_s=10), step_sample_ratio=1.0)
    yield core
    core.dispatcher.transport.close()
    for server, _, _ in servers:
        server.stop(0)


def test_sampled_steps_trace_each_layers_dispatch_and_the_shards_compute(sharded_core, spans):
    gateway = Gateway({"scout": LocalBackend(sharded_core, max_ongoing_requests=4, max_queued_requests=4)})

    async def main():
        async with _http(gateway) as http:
            return await http.post("/v1/chat/completions", json=_chat(max_tokens=3),
                                   headers={"traceparent": TRACEPARENT})

    assert asyncio.run(main()).status_code == 200
    finished = spans.get_finished_spans()
    steps = [s for s in finished if s.name == "herd.engine.step"]
    dispatches = [s for s in finished if s.name == "herd.expert_dispatch"]
    computes = [s for s in finished if s.name == "herd.expert_shard.compute"]
    moe_layers = len(sharded_core.engine.engine.model.config.moe_layers)
    assert len(steps) == 3, "prefill + two decodes, each traced at step_sample_ratio 1"
    assert len(dispatches) == 3 * moe_layers
    step_ids = {s.context.span_id for s in steps}
    assert all(d.parent.span_id in step_ids for d in dispatches)
    assert sorted(d.attributes["herd.layer"] for d in dispatches) == sorted(sharded_core.engine.engine.model.config
                                                                            .moe_layers * 3)
    # Every shard that got rows computed them inside the dispatch's span, across the gRPC stream.
    dispatch_ids = {d.context.span_id for d in dispatches}
    assert computes and all(c.parent.span_id in dispatch_ids for c in computes)
    assert all(c.context.trace_id == steps[0].context.trace_id for c in computes if c.parent.span_id in
               {d.context.span_id for d in dispatches if d.parent.span_id == steps[0].context.span_id})
    replica = next(s for s in finished if s.name == "herd.replica.generate")
    assert all(any(link.context.span_id == replica.context.span_id for link in s.links) for s in steps), \
        "each step links to the request it advanced"


def test_gateway_metrics_count_requests_tokens_latencies_and_rejections(gateway):
    async def main():
        async with _http(gateway) as http:
            answers = [await http.post("/v1/chat/completions", json=_chat(f"question {i}")) for i in range(3)]
            await http.post("/v1/chat/completions", json=_chat(model="nope"))
            await http.post("/v1/chat/completions", json=_chat(max_tokens=10**6))
            text = await _metrics(gateway)
            return answers, text

    answers, text = asyncio.run(main())
    samples = _samples(text)
    completion = sum(a.json()["usage"]["completion_tokens"] for a in answers)
    prompt = sum(a.json()["usage"]["prompt_tokens"] for a in answers)
    assert _value(samples, "herd_requests_total", model="scout", tenant="default", status="ok") == 3
    assert _value(samples, "herd_rejected_requests_total", code="NOT_FOUND") == 1
    assert _value(samples, "herd_rejected_requests_total", code="INVALID_ARGUMENT") == 1
    assert _value(samples, "herd_generation_tokens_total", model="scout", tenant="default") == completion
    assert _value(samples, "herd_prompt_tokens_total", model="scout", tenant="default") == prompt
    assert _value(samples, "herd_time_to_first_token_seconds_count", model="scout") == 3
    assert _value(samples, "herd_inter_token_latency_seconds_count", model="scout") == completion - 3
    assert _value(samples, "herd_e2e_request_latency_seconds_count", model="scout", status="ok") == 3
    assert _value(samples, "herd_requests_in_flight", model="scout") == 0
    assert ("herd_requests_waiting_for_replica", (("model", "scout"),)) in samples


def test_rate_limit_refusals_are_counted_by_limit(tmp_path, core):
    store = TenantStore(connect(f"sqlite:///{tmp_path / 'herd.db'}"))
    migrate(store.engine)
    store.create_tenant("a", allowed_models=["scout"], requests_per_min=1)
    key = store.issue_key("a")[1]
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=4, max_queued_requests=4)},
                      guard=Guard(store, InProcessRateLimiter(), UsageLedger(store)))

    async def main():
        async with _http(gateway) as http:
            codes = [(await http.post("/v1/chat/completions", json=_chat(), headers={"authorization": f"Bearer {key}"}))
                     .status_code for _ in range(3)]
            unauthenticated = await http.post("/v1/chat/completions", json=_chat())
            return codes, unauthenticated.status_code, await _metrics(gateway)

    codes, unauthenticated, text = asyncio.run(main())
    samples = _samples(text)
    assert codes == [200, 429, 429] and unauthenticated == 401
    assert _value(samples, "herd_rate_limited_requests_total", model="scout", tenant="a", limit="requests_per_min") == 2
    assert _value(samples, "herd_requests_total", model="scout", tenant="a", status="resource_exhausted") == 2
    assert _value(samples, "herd_requests_total", model="scout", tenant="a", status="ok") == 1
    assert _value(samples, "herd_rejected_requests_total", code="UNAUTHENTICATED") == 1


def test_replica_metrics_follow_the_engine_and_the_experts(core):
    before = _samples(generate_latest(core.metrics.registry).decode())
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=4, max_queued_requests=4)})
    prompts = [list(range(100 + 20 * i, 117 + 20 * i)) for i in range(3)]  # distinct: no prefix-cache hit

    async def main():
        async with _http(gateway) as http:
            return [await http.post("/v1/completions", json={"model": "scout", "prompt": p, "max_tokens": 5,
                                                            "temperature": 0}) for p in prompts]

    answers = asyncio.run(main())
    after = _samples(generate_latest(core.metrics.registry).decode())

    def grew(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    config = core.engine.engine.model.config
    computed = sum(len(p) + a.json()["usage"]["completion_tokens"] - 1 for p, a in zip(prompts, answers, strict=True))
    for layer in config.moe_layers:
        routed = sum(grew("herd_expert_tokens_total", model="scout", layer=str(layer), expert=str(e))
                     for e in range(config.num_local_experts))
        assert routed == computed * config.num_experts_per_tok, f"layer {layer}: every computed token routed once"
    assert grew("herd_replica_queue_seconds_count", model="scout") == 3
    assert grew("herd_replica_prefill_seconds_count", model="scout") == 3
    assert grew("herd_replica_decode_seconds_count", model="scout") == 3
    assert grew("herd_expert_dispatch_seconds_count", model="scout") >= 5 * len(config.moe_layers)
    assert grew("herd_replica_prefix_cache_queries_tokens_total", model="scout") == sum(len(p) - 1 for p in prompts)
    assert grew("herd_replica_prefix_cache_hits_tokens_total", model="scout") == 0
    assert _value(after, "herd_replica_requests_running", model="scout") == 0
    assert _value(after, "herd_replica_requests_waiting", model="scout") == 0
    assert 0 <= _value(after, "herd_replica_kv_cache_usage_ratio", model="scout", group="full") <= 1


def test_the_replica_serves_its_metrics_over_http(core):
    port = core.metrics.serve(0, host="127.0.0.1")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "herd_replica_requests_running" in text and "herd_expert_tokens_total" in text


def test_json_logs_carry_request_and_trace_ids_and_never_the_prompt_or_key(tmp_path, core, spans):
    stream = io.StringIO()
    level = logging.getLogger().level
    handler = configure_logging(TelemetrySettings(log_format="json", log_level="INFO"), stream=stream)
    store = TenantStore(connect(f"sqlite:///{tmp_path / 'herd.db'}"))
    migrate(store.engine)
    store.create_tenant("a", allowed_models=["scout"])
    key = store.issue_key("a")[1]
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=4, max_queued_requests=4)},
                      guard=Guard(store, InProcessRateLimiter(), UsageLedger(store)))
    secret_prompt = "zebra-marker-7731 is my secret"

    class DuringStream:  # logs from inside the request's stream, as the gateway's own code would
        def __init__(self, inner):
            self.inner, self.name, self.tokenizer = inner, inner.name, inner.tokenizer
            self.image_prompts = inner.image_prompts

        def card(self):
            return self.inner.card()

        async def ready_replicas(self):
            return 1

        async def generate(self, request):
            async for chunk in self.inner.generate(request):
                logging.getLogger("herd.test.during").info("chunk of %d tokens", len(chunk.token_ids))
                yield chunk

    gateway.backends["scout"] = DuringStream(gateway.backends["scout"])

    async def main():
        async with _http(gateway) as http:
            await http.post("/v1/chat/completions", json=_chat(secret_prompt, stream=True),
                            headers={"authorization": f"Bearer {key}"})
            logging.getLogger("herd.test").warning("a key in a message: %s", key)

    try:
        asyncio.run(main())
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (access,) = [entry for entry in lines if entry["logger"] == "herd.access"]
    (request,) = [s for s in spans.get_finished_spans() if s.name == "herd.request scout"]
    assert access["request_id"].startswith("herd-") and access["request_id"] == request.attributes["herd.request_id"]
    assert access["trace_id"] == format(request.context.trace_id, "032x")
    assert access["tenant"] == "a" and access["status"] == "ok" and access["completion_tokens"] > 0
    during = [e for e in lines if e["logger"] == "herd.test.during"]
    assert during and all((e["request_id"], e["trace_id"]) == (access["request_id"], access["trace_id"])
                          for e in during), "a line logged while the request streams carries its ids"
    text = stream.getvalue()
    assert "zebra-marker" not in text and key not in text
    assert key.rsplit("_", 1)[0] + "_[redacted]" in text, "a key that slips into a message is cut to its prefix"


def test_prompt_text_is_in_the_span_only_when_enabled(core, spans):
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=4, max_queued_requests=4)}, log_prompts=True)

    async def main():
        async with _http(gateway) as http:
            await http.post("/v1/chat/completions", json=_chat("zebra-marker-7731"))

    asyncio.run(main())
    (request,) = [s for s in spans.get_finished_spans() if s.name == "herd.request scout"]
    assert "zebra-marker-7731" in request.attributes["herd.prompt"]
