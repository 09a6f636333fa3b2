"""Reading Ray Serve's instance details: the JSON of the Ray dashboard's `GET /api/serve/applications/`
(ray.serve.schema.ServeInstanceDetails). Pure functions; whoever holds the JSON fetched it."""

from __future__ import annotations

from typing import Any


def replica_counts(details: dict[str, Any], application: str) -> dict[str, int]:
    """Replicas of `application` by state (RUNNING, STARTING, UPDATING, STOPPING, ...); {} when absent."""
    app = (details.get("applications") or {}).get(application) or {}
    counts: dict[str, int] = {}
    for deployment in (app.get("deployments") or {}).values():
        for replica in deployment.get("replicas") or ():
            counts[replica.get("state", "?")] = counts.get(replica.get("state", "?"), 0) + 1
    return counts


def target_replicas(details: dict[str, Any], application: str) -> int | None:
    """What Serve is bringing `application`'s deployments to (summed); None when it has no such application."""
    app = (details.get("applications") or {}).get(application)
    if not app:
        return None
    return sum(int(d.get("target_num_replicas") or 0) for d in (app.get("deployments") or {}).values())
