"""Telemetry: traces (OpenTelemetry), the gateway's Prometheus metrics, structured logs."""

from __future__ import annotations

from herd.platform.settings import TelemetrySettings
from herd.platform.telemetry.logs import configure_logging
from herd.platform.telemetry.tracing import configure_tracing


def configure_process(settings: TelemetrySettings, role: str) -> None:
    """What every Herd process does first: its logs' format and its tracer provider."""
    configure_logging(settings)
    configure_tracing(settings, role)


__all__ = ["configure_process"]
