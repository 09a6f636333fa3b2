"""What the control plane scales: units, each one Serve deployment of a model's application.

A colocated model is one unit, its own deployment (named as the model). A disaggregated model is two, its prefill
and its decode pool (deployments <model>-prefill and <model>-decode; the proxy in front, named as the model, keeps
its replicas). A unit is known by its name: the model's for a colocated model, the pool's deployment for a pool.

Each pool scales on its own share of the model's load, as the gateway sees the model (every request of it passes
the prefill pool first, then the decode pool): the prefill pool on the requests still waiting for their first
token and on time to first token; the decode pool on the requests in flight, inter-token latency and its KV use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from herd.platform.controlplane.policy import ModelMetrics
from herd.workers.replica_config import Pool, pool_deployment


@dataclass(frozen=True)
class Unit:
    model: str  # the Serve application, and the model's name at the gateway
    deployment: str  # the deployment scaled
    pool: Pool | None = None  # None: the colocated model itself

    @property
    def name(self) -> str:
        """How the policy, the log, /herd/controlplane and the metrics' `model` label know the unit."""
        return self.deployment


def colocated(model: str) -> Unit:
    return Unit(model=model, deployment=model)


def pool(model: str, which: Pool) -> Unit:
    return Unit(model=model, deployment=pool_deployment(model, which), pool=which)


def unit_metrics(unit: Unit, load: ModelMetrics) -> ModelMetrics:
    """The unit's share of its model's load (pure). Prefill: what waits for its first token runs there (or is
    queued for a replica at the gateway), with the TTFT p95; decode: everything in flight, with the ITL p95 and
    KV use. A colocated model takes all of it."""
    if unit.pool == "prefill":
        return ModelMetrics(running=max(0, load.awaiting_first_token - load.queued), queued=load.queued,
                            awaiting_first_token=load.awaiting_first_token, refused_cold=load.refused_cold,
                            ttft_p95_s=load.ttft_p95_s, ready=load.ready, starting=load.starting)
    if unit.pool == "decode":
        return replace(load, ttft_p95_s=None)
    return load


__all__ = ["Unit", "colocated", "pool", "unit_metrics"]
