"""Logs: the formats, the ids on every record, and key material cut to its public prefix."""

from __future__ import annotations

import io
import json
import logging

from opentelemetry import trace

from herd.platform.settings import TelemetrySettings
from herd.platform.telemetry.logs import configure_logging, redact, request_id
from herd.platform.telemetry.tracing import configure_tracing

KEY = "hk_AbCd1234_" + "s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXY"


def _capture(settings: TelemetrySettings, emit) -> str:
    stream = io.StringIO()
    level = logging.getLogger().level
    handler = configure_logging(settings, stream=stream)
    try:
        emit()
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    return stream.getvalue()


def test_redact_keeps_the_public_prefix_only():
    assert redact(f"key={KEY} end") == "key=hk_AbCd1234_[redacted] end"
    assert redact("no key here, hk_ alone") == "no key here, hk_ alone"


def test_json_lines_carry_ids_extra_fields_and_exceptions():
    configure_tracing(TelemetrySettings(traces="memory"), "test")
    log = logging.getLogger("herd.test.logs")

    def emit():
        token = request_id.set("herd-abc")
        try:
            with trace.get_tracer("test").start_as_current_span("s") as span:
                log.info("hello %s", "world", extra={"tenant": "a", "tokens": 3})
                emit.trace_id = format(span.get_span_context().trace_id, "032x")
            try:
                raise ValueError(f"bad {KEY}")
            except ValueError:
                log.exception("failed")
        finally:
            request_id.reset(token)
        log.info("outside")

    lines = [json.loads(x) for x in _capture(TelemetrySettings(log_format="json"), emit).splitlines()]
    hello, failed, outside = lines
    assert hello["message"] == "hello world" and hello["level"] == "INFO" and hello["logger"] == "herd.test.logs"
    assert hello["request_id"] == "herd-abc" and hello["trace_id"] == emit.trace_id and len(hello["span_id"]) == 16
    assert hello["tenant"] == "a" and hello["tokens"] == 3
    assert "ValueError" in failed["exception"] and KEY not in failed["exception"] and failed["request_id"] == "herd-abc"
    assert outside["request_id"] == "" and outside["trace_id"] == ""


def test_text_lines_and_levels():
    log = logging.getLogger("herd.test.logs")
    text = _capture(TelemetrySettings(log_format="text", log_level="WARNING"),
                    lambda: (log.info("quiet"), log.warning("loud %s", KEY)))
    assert "quiet" not in text and "WARNING herd.test.logs" in text and "loud hk_AbCd1234_[redacted]" in text


def test_configuring_twice_replaces_herds_handler():
    level = logging.getLogger().level
    first = configure_logging(TelemetrySettings())
    second = configure_logging(TelemetrySettings(log_format="json"))
    root = logging.getLogger()
    try:
        assert first not in root.handlers and second in root.handlers
    finally:
        root.removeHandler(second)
        root.setLevel(level)
