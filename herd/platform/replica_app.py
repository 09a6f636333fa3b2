"""The Serve application of one model, with the platform's telemetry set up in its processes.

`herd.platform.replica_app:build_app` is the import path `herd serve --print-config` (and the Helm
chart's RayService) names. It builds herd.workers.serve_app's application and injects the process
set-up (log format, tracer provider) that each replica and expert-shard process runs first: the
workers layer owns the hook, the platform fills it, and no import runs back up.
"""

from __future__ import annotations

import functools
from typing import Any

from ray import serve

from herd.platform.settings import TelemetrySettings
from herd.platform.telemetry import configure_process
from herd.workers import serve_app


def build_app(args: dict[str, Any]) -> serve.Application:
    settings = TelemetrySettings.model_validate(args.get("telemetry", {}))
    setup = functools.partial(_setup, settings.model_dump(mode="json"))
    return serve_app.build_app(args, process_setup=setup)


def _setup(settings: dict[str, Any], role: str) -> None:
    configure_process(TelemetrySettings.model_validate(settings), role)


__all__ = ["build_app"]
