"""A replica's /metrics listens where the telemetry settings say: loopback unless opened."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from herd.workers.model_replica import ModelReplica
from herd.workers.replica_config import ReplicaArgs
from herd.workers.replica_metrics import ReplicaMetrics
from tests.unit.workers.network import listening_hosts, refused_on_the_network


def _serve_metrics(args: dict[str, Any]) -> int:
    """ModelReplica._serve_metrics on a replica whose engine is never scraped here."""
    replica = SimpleNamespace(args=ReplicaArgs.model_validate(args),
                              core=SimpleNamespace(metrics=ReplicaMetrics("scout", None, None)))  # type: ignore[arg-type]
    port = ModelReplica.func_or_class._serve_metrics(replica, 0)  # type: ignore[attr-defined]
    assert port is not None
    return int(port)


def test_replica_metrics_bind_loopback_by_default() -> None:
    port = _serve_metrics({})
    assert listening_hosts(port) == {"127.0.0.1"}
    assert refused_on_the_network(port)


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_replica_metrics_bind_the_configured_host(host: str) -> None:
    port = _serve_metrics({"telemetry": {"replica_metrics_host": host}})
    assert listening_hosts(port) == {host}
