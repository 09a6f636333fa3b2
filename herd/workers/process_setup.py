"""The hook a replica's or a shard's process runs first."""

from __future__ import annotations

from collections.abc import Callable

ProcessSetup = Callable[[str], None]
"""Given the process's role ("replica", "expert-shard"), set up its logs and traces: the platform's telemetry,
injected by herd.platform.replica_app, since this layer never imports the platform."""
