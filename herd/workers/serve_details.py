"""Reading Ray Serve's instance details: the JSON of the Ray dashboard's `GET /api/serve/applications/`
(ray.serve.schema.ServeInstanceDetails). Pure functions; whoever holds the JSON fetched it."""

from __future__ import annotations

from typing import Any


def _deployments(app: dict[str, Any], deployment: str | None) -> list[dict[str, Any]]:
    """The application's deployments, or only the one named `deployment` (none when it has no such one)."""
    deployments: dict[str, Any] = app.get("deployments") or {}
    if deployment is None:
        return list(deployments.values())
    return [deployments[deployment]] if deployments.get(deployment) else []


def replica_counts(details: dict[str, Any], application: str, deployment: str | None = None) -> dict[str, int]:
    """Replicas of `application` (of its `deployment` alone, when named) by state (RUNNING, STARTING, UPDATING,
    STOPPING, ...); {} when absent."""
    app = (details.get("applications") or {}).get(application) or {}
    counts: dict[str, int] = {}
    for one in _deployments(app, deployment):
        for replica in one.get("replicas") or ():
            counts[replica.get("state", "?")] = counts.get(replica.get("state", "?"), 0) + 1
    return counts


def target_replicas(details: dict[str, Any], application: str, deployment: str | None = None) -> int | None:
    """What Serve is bringing `application`'s deployments to (summed), or its `deployment` alone when named; None
    when it has no such application (or no such deployment)."""
    app = (details.get("applications") or {}).get(application)
    if not app:
        return None
    found = _deployments(app, deployment)
    if deployment is not None and not found:
        return None
    return sum(int(d.get("target_num_replicas") or 0) for d in found)
