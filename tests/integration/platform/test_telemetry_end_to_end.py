"""Under herd serve, one request is one trace across processes: the gateway, the Ray Serve replica and
the expert-shard actors each export their spans over OTLP to a collector (here, one in the test); the
replica serves its own /metrics, and the gateway's /metrics counts the request."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx

from herd.model.tiny import make_tiny
from tests.integration.platform.processes import free_port, interrupt, wait_until_serving
from tests.unit.platform.telemetry.otlp_collector import Collector

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def test_one_trace_from_gateway_to_replica_to_expert_shards_and_metrics_on_both(tmp_path):
    collector = Collector()
    model = make_tiny(tmp_path / "scout", preset="scout", seed=5)
    port, ops_port = free_port(), free_port()
    config = tmp_path / "herd.json"
    config.write_text(json.dumps({
        "models": [{"name": "scout", "path": str(model), "shards": 2, "transport": "grpc"}],
        "tenancy": {"auth": False},
        "telemetry": {"traces": "otlp", "otlp_endpoint": collector.endpoint, "step_sample_ratio": 1.0,
                      "log_format": "json"},
        "ops_port": ops_port,
    }))
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", "--config", str(config),
                             "--http-port", str(port), "--grpc-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    output: list[str] = []
    try:
        wait_until_serving(proc, output)

        body = {"model": "scout", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 4,
                "temperature": 0}
        reply = httpx.post(url + "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}, timeout=120)
        assert reply.status_code == 200, reply.text
        ops = f"http://127.0.0.1:{ops_port}"
        stats = httpx.get(ops + "/herd/stats", timeout=30).json()["scout"]
        replica_metrics = httpx.get(f"http://127.0.0.1:{stats['metrics_port']}/metrics", timeout=30).text
        gateway_metrics = httpx.get(ops + "/metrics", timeout=30).text

        wanted = {("herd-gateway", "herd.request scout"), ("herd-replica", "herd.replica.generate"),
                  ("herd-replica", "herd.expert_dispatch"), ("herd-expert-shard", "herd.expert_shard.compute")}
        deadline = time.monotonic() + 60  # the batch processors export every 5 s
        while time.monotonic() < deadline and not wanted <= {(svc, s.name) for svc, s in collector.spans}:
            time.sleep(0.5)
    finally:
        interrupt(proc)
        collector.stop()
    log = "".join(output[-40:])
    seen = {(svc, s.name) for svc, s in collector.spans}
    assert wanted <= seen, f"{sorted(seen)}\n{log}"

    spans = [s for _, s in collector.spans]
    request = next(s for svc, s in collector.spans if s.name == "herd.request scout")
    replica = next(s for s in spans if s.name == "herd.replica.generate")
    assert request.trace_id.hex() == TRACE_ID and replica.trace_id.hex() == TRACE_ID
    assert replica.parent_span_id == request.span_id, "the replica's span is a child of the gateway's"
    phases = {s.name for s in spans if s.parent_span_id == replica.span_id}
    assert phases == {"herd.engine.queue", "herd.engine.prefill", "herd.engine.decode"}
    steps = [s for s in spans if s.name == "herd.engine.step"]
    assert any(link.span_id == replica.span_id for s in steps for link in s.links), "steps link to the request"
    dispatch_ids = {s.span_id for s in spans if s.name == "herd.expert_dispatch"}
    computes = [s for svc, s in collector.spans if svc == "herd-expert-shard"]
    assert computes and all(c.parent_span_id in dispatch_ids for c in computes), "the shards join over gRPC"

    assert "herd_requests_total{model=\"scout\",status=\"ok\",tenant=\"default\"} 1.0" in gateway_metrics
    assert "herd_replica_requests_running{model=\"scout\"}" in replica_metrics
    assert "herd_expert_tokens_total{" in replica_metrics
    access = [json.loads(line) for line in output if line.startswith("{") and '"herd.access"' in line]
    assert access and access[0]["trace_id"] == TRACE_ID and access[0]["request_id"].startswith("herd-")
