"""Traces: one OpenTelemetry tracer provider per process, its exporter chosen by TelemetrySettings.traces.

Every Herd process (gateway, replica, expert shard) calls `configure_tracing` once at start. Herd's code
asks the OpenTelemetry API for tracers by name (`trace.get_tracer("herd.gateway")`), so spans go wherever
this configured them, or nowhere when tracing is off. Context crosses processes as W3C `traceparent`:
HTTP headers and gRPC metadata at the doors, a map in the internal GenerateRequest and DispatchRequest.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from herd.platform.settings import TelemetrySettings

log = logging.getLogger("herd.telemetry")

MEMORY = InMemorySpanExporter()
"""Where spans go under `traces: memory` (tests read `MEMORY.get_finished_spans()`)."""

_processors: dict[tuple[str, str], SpanProcessor] = {}


def configure_tracing(settings: TelemetrySettings, role: str) -> TracerProvider | None:
    """Install this process's tracer provider (service `<service_name>-<role>`); None when traces are off.

    OpenTelemetry allows one global provider per process: a second call (tests, or a gateway and a
    replica in one process) keeps the first provider and adds the new exporter to it, once per kind."""
    if settings.traces == "none":
        return None
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        sampler = ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))
        resource = Resource.create({"service.name": f"{settings.service_name}-{role}"})
        provider = TracerProvider(resource=resource, sampler=sampler)
        trace.set_tracer_provider(provider)
    key = (settings.traces, settings.otlp_endpoint if settings.traces == "otlp" else "")
    if key not in _processors:
        exporter = _exporter(settings)
        # Memory and console are for tests and a terminal: spans as they end. OTLP batches off the hot path.
        processor = BatchSpanProcessor(exporter) if settings.traces == "otlp" else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
        _processors[key] = processor
        log.info("traces: %s%s", settings.traces, f" to {settings.otlp_endpoint}" if settings.traces == "otlp" else "")
    return provider


def flush_traces(timeout_ms: int = 5000) -> None:
    """Export every ended span now (before a process exits, or before a test reads the collector)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_ms)


def inject(context: Context | None = None) -> dict[str, str]:
    """The W3C trace context of `context` (default: the current one) as a string map."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> Context:
    """The remote parent in a string map (headers, gRPC metadata, a message's trace_context)."""
    return propagate.extract({k.lower(): v for k, v in (carrier or {}).items()})


def _exporter(settings: TelemetrySettings) -> SpanExporter:
    if settings.traces == "memory":
        return MEMORY
    if settings.traces == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure)


__all__ = ["MEMORY", "configure_tracing", "extract", "flush_traces", "inject"]
