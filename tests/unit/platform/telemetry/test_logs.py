"""Logs: the formats, the ids on every record, key material cut to its public prefix, and credentials in
URLs and parameters hidden by every format."""

from __future__ import annotations

import io
import json
import logging

import pytest
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


# --- credentials in URLs and parameters -------------------------------------------------------------------
PASSWORD = "pg-S3cret!pw"
URL = f"postgresql+psycopg://herd:{PASSWORD}@db.internal:5432/herd"


@pytest.mark.parametrize(("text", "expected"), [
    (URL, "postgresql+psycopg://herd:[redacted]@db.internal:5432/herd"),
    (f"redis://:{PASSWORD}@redis:6379/0", "redis://:[redacted]@redis:6379/0"),
    (f"tenancy at {URL}; admin", "tenancy at postgresql+psycopg://herd:[redacted]@db.internal:5432/herd; admin"),
    ("postgresql://herd:p@ss@db/herd", "postgresql://herd:[redacted]@db/herd"),  # an unescaped @ in the password
    (f"postgresql://db/herd?user=herd&password={PASSWORD}&sslmode=require",
     "postgresql://db/herd?user=herd&password=[redacted]&sslmode=require"),
    (f"host=db user=herd password={PASSWORD} dbname=herd", "host=db user=herd password=[redacted] dbname=herd"),
    (f"https://x/cb?access_token={PASSWORD}", "https://x/cb?access_token=[redacted]"),
])
def test_redact_hides_passwords_in_urls_and_parameters(text, expected):
    assert redact(text) == expected and PASSWORD not in redact(text)


@pytest.mark.parametrize("text", [
    "http://127.0.0.1:8000/v1", "sqlite:///.herd/herd.db", "redis://redis:6379/0", "user@example.com wrote",
    "postgresql://herd@db/herd", "max_tokens=16 tokens=3", "herd:8000 and a@b",
])
def test_redact_leaves_what_holds_no_credential(text):
    assert redact(text) == text


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_format_redacts_message_args_extras_exceptions_and_stacks(log_format):
    log = logging.getLogger("herd.test.logs")

    def emit():
        log.info("connecting to " + URL)
        log.info("connecting to %s", URL)
        log.info("connecting to %(url)s", {"url": URL})
        log.info("settings", extra={"database_url": URL, "nested": {"urls": [URL]}})
        log.info("here", stack_info=True, extra={"where": URL})
        try:
            raise ConnectionError(f"could not reach {URL}")
        except ConnectionError:
            log.exception("failed")

    text = _capture(TelemetrySettings(log_format=log_format), emit)
    shown = {"text": 4, "json": 7}[log_format]  # three messages and the exception; json adds the extras
    assert PASSWORD not in text and text.count("herd:[redacted]@db.internal") == shown
    if log_format == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        assert lines[3]["database_url"].endswith("[redacted]@db.internal:5432/herd")
        assert "ConnectionError" in lines[5]["exception"]
