"""Where the control plane reads each model's load: the gateway in this process, or gateways over HTTP
(their /herd/load, summed over the gateway pods)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import httpx

from herd.platform.controlplane.policy import ModelMetrics


class MetricsSource(Protocol):
    async def read(self) -> dict[str, ModelMetrics]: ...


def from_load(load: dict[str, dict[str, Any]]) -> dict[str, ModelMetrics]:
    """Gateway load snapshots ({model: {in_flight, ttft_p95_s, output_tokens_per_s}}) as policy inputs."""
    return {name: ModelMetrics(running=int(v["in_flight"]), ttft_p95_s=v["ttft_p95_s"],
                               output_tokens_per_s=float(v["output_tokens_per_s"]))
            for name, v in load.items()}


class GatewayLoadSource:
    """The gateway running in this process (herd serve)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    async def read(self) -> dict[str, ModelMetrics]:
        return from_load(self.gateway.load.snapshot())


class HttpLoadSource:
    """Gateways elsewhere: in-flight requests and token rates add up; TTFT p95 takes the worst."""

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 5.0) -> None:
        self.urls = list(urls)
        self.timeout_s = timeout_s

    async def read(self) -> dict[str, ModelMetrics]:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            answers = await asyncio.gather(*(client.get(u.rstrip("/") + "/herd/load") for u in self.urls),
                                           return_exceptions=True)
        merged: dict[str, dict[str, Any]] = {}
        for answer in answers:
            if isinstance(answer, BaseException) or answer.status_code != 200:
                continue  # a gateway that does not answer contributes nothing this round
            for model, load in answer.json().items():
                into = merged.setdefault(model, {"in_flight": 0, "ttft_p95_s": None, "output_tokens_per_s": 0.0})
                into["in_flight"] += load["in_flight"]
                into["output_tokens_per_s"] += load["output_tokens_per_s"]
                if load["ttft_p95_s"] is not None:
                    into["ttft_p95_s"] = max(into["ttft_p95_s"] or 0.0, load["ttft_p95_s"])
        return from_load(merged)
