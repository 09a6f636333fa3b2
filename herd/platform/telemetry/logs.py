"""Logs: text or one JSON object per line, each carrying the request id and the trace id it belongs to.

The request id is a context variable the gateway sets for the life of a request; the trace and span ids
come from the current OpenTelemetry span. Prompt text and key material are never put in a log record by
Herd's code (`log_prompts` only adds prompt text to spans); `redact` is the last guard for messages that
quote a key or a credential anyway. Both formats apply it to everything they write (message with its
arguments, `extra=` fields, exception and stack text), and whatever Herd prints for an operator goes
through it too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

from herd.platform.settings import TelemetrySettings

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("herd_request_id", default="")
"""The request the current task serves ("" outside one)."""

trace_ids: dict[str, tuple[str, str]] = {}
"""request id -> (trace id, span id) of the requests in flight in this process: a line logged while a request
is served carries its trace even where its span is not the current one (the gateway keeps a request's span
open across a stream without making it current)."""

_KEY = re.compile(r"\bhk_[A-Za-z0-9]{4,}_[A-Za-z0-9_-]{8,}")
# scheme://user:password@host: the password runs to the authority's last @ (one may be left unescaped in it).
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/?#@]*:)[^\s/?#]*@")
# password=... as a URL query or libpq keyword parameter, and a URL's token or API key.
_PARAMETER = re.compile(r"(?i)\b(\w*password|passwd|pwd|secret|(?:access_|refresh_)?token|api_?key)=[^\s&;'\"]+")
_REDACTED = "[redacted]"
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id", "trace_id", "span_id"}


def redact(text: str) -> str:
    """`text` with anything shaped like a Herd API key replaced by its public prefix, and the passwords of
    URLs (`scheme://user:[redacted]@host`) and password/secret/token parameters replaced."""
    text = _KEY.sub(lambda m: m.group(0).rsplit("_", 1)[0] + "_" + _REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: m.group(1) + _REDACTED + "@", text)
    return _PARAMETER.sub(lambda m: m.group(1) + "=" + _REDACTED, text)


def _redacted(value: object) -> object:
    """An `extra=` field as it may be written: strings redacted, also inside lists and dicts."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return value


class ContextFilter(logging.Filter):
    """Stamps every record with request_id, trace_id and span_id (empty when there are none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        span = trace.get_current_span().get_span_context()
        rid = getattr(record, "request_id", "") or request_id.get()
        if span.is_valid:
            trace_id, span_id = format(span.trace_id, "032x"), format(span.span_id, "016x")
        else:
            trace_id, span_id = trace_ids.get(rid, ("", ""))
        # Set as logging sets `extra=` fields: LogRecord declares no such attributes.
        record.__dict__.update(request_id=rid, trace_id=trace_id, span_id=span_id)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, ids, and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "request_id": getattr(record, "request_id", ""),
            "trace_id": getattr(record, "trace_id", ""),
            "span_id": getattr(record, "span_id", ""),
        }
        entry.update({k: _redacted(v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, default=lambda value: redact(str(value)))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s %(trace_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(settings: TelemetrySettings, stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger through one handler of the configured format (replacing Herd's earlier one)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.set_name("herd")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "herd"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler


__all__ = ["ContextFilter", "JsonFormatter", "configure_logging", "redact", "request_id"]
