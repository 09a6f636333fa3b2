"""Tracing set-up: OTLP export to a collector (in a child process, which owns its global provider),
trace context in and out of string maps, and tracing off by default."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from opentelemetry import trace

from herd.platform.settings import TelemetrySettings
from herd.platform.telemetry.tracing import configure_tracing, extract, inject
from tests.unit.platform.telemetry.otlp_collector import Collector

REPO = Path(__file__).resolve().parents[4]

CHILD = textwrap.dedent("""
    import sys
    from opentelemetry import trace
    from herd.platform.settings import TelemetrySettings
    from herd.platform.telemetry.tracing import configure_tracing, flush_traces

    configure_tracing(TelemetrySettings(traces="otlp", otlp_endpoint=sys.argv[1], service_name="herdtest"), "gateway")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("outer"):
        with tracer.start_as_current_span("inner"):
            pass
    flush_traces()
""")


def test_spans_reach_an_otlp_collector_with_the_service_name():
    collector = Collector()
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, collector.endpoint], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    finally:
        collector.stop()
    assert sorted(collector.names("herdtest-gateway")) == ["inner", "outer"]
    spans = {s.name: s for _, s in collector.spans}
    assert spans["inner"].parent_span_id == spans["outer"].span_id
    assert spans["inner"].trace_id == spans["outer"].trace_id


def test_tracing_is_off_by_default():
    assert TelemetrySettings().traces == "none"
    assert configure_tracing(TelemetrySettings(), "test") is None


def test_trace_context_round_trips_through_a_string_map():
    configure_tracing(TelemetrySettings(traces="memory"), "test")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("parent") as span:
        carrier = inject()
    assert set(carrier) == {"traceparent"}
    context = extract({"TraceParent": carrier["traceparent"]})  # metadata keys arrive in any case
    remote = trace.get_current_span(context).get_span_context()
    assert remote.trace_id == span.get_span_context().trace_id and remote.span_id == span.get_span_context().span_id
    assert not trace.get_current_span(extract({})).get_span_context().is_valid
    assert not trace.get_current_span(extract({"traceparent": "garbage"})).get_span_context().is_valid
