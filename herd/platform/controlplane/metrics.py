"""Where the control plane reads each model's load: the gateway in this process, or gateways over HTTP
(their /herd/load, summed over the gateway pods)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from herd.platform.controlplane.policy import ModelMetrics

if TYPE_CHECKING:
    from herd.platform.gateway.core import Gateway


class MetricsSource(Protocol):
    async def read(self) -> dict[str, ModelMetrics]: ...


_SUMMED = ("in_flight", "in_flight_tokens", "waiting_for_replica", "refused_cold", "output_tokens_per_s")


def from_load(load: dict[str, dict[str, Any]]) -> dict[str, ModelMetrics]:
    """Gateway load snapshots (herd.platform.gateway.load.LoadTracker.snapshot) as policy inputs: what is
    held for a replica is queued, the rest of what is in flight runs (or waits in Serve's queue)."""
    return {name: ModelMetrics(running=int(v["in_flight"] - v["waiting_for_replica"]),
                               queued=int(v["waiting_for_replica"]), in_flight_tokens=int(v["in_flight_tokens"]),
                               refused_cold=int(v["refused_cold"]), ttft_p95_s=v["ttft_p95_s"],
                               output_tokens_per_s=float(v["output_tokens_per_s"]))
            for name, v in load.items()}


class GatewayLoadSource:
    """The gateway running in this process (herd serve)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def read(self) -> dict[str, ModelMetrics]:
        return from_load(self.gateway.load.snapshot())


class HttpLoadSource:
    """Gateways elsewhere: requests, tokens and refusals add up over gateways; TTFT p95 takes the worst.
    With `resolve`, each URL's host is looked up every round and every address asked: a headless Service
    names every gateway pod that way, however many the HPA runs."""

    def __init__(self, urls: Sequence[str], *, resolve: bool = False, timeout_s: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 lookup: Callable[[str, int], Awaitable[list[str]]] | None = None) -> None:
        self.urls = list(urls)
        self.resolve = resolve
        self.timeout_s = timeout_s
        self.transport = transport  # tests: answers without sockets
        self.lookup = lookup or _addresses

    async def targets(self) -> list[str]:
        """The URLs to ask this round."""
        if not self.resolve:
            return [u.rstrip("/") for u in self.urls]
        out: list[str] = []
        for url in self.urls:
            parsed = httpx.URL(url)
            try:
                addresses = await self.lookup(parsed.host, parsed.port or 80)
            except OSError:
                continue  # no gateway answers to that name this round
            out += [str(parsed.copy_with(host=a)).rstrip("/") for a in addresses]
        return list(dict.fromkeys(out))

    async def read(self) -> dict[str, ModelMetrics]:
        urls = await self.targets()
        async with httpx.AsyncClient(timeout=self.timeout_s, transport=self.transport) as client:
            answers = await asyncio.gather(*(client.get(u + "/herd/load") for u in urls), return_exceptions=True)
        merged: dict[str, dict[str, Any]] = {}
        for answer in answers:
            if isinstance(answer, BaseException) or answer.status_code != 200:
                continue  # a gateway that does not answer contributes nothing this round
            for model, load in answer.json().items():
                into = merged.setdefault(model, {**dict.fromkeys(_SUMMED, 0), "ttft_p95_s": None})
                for key in _SUMMED:
                    into[key] += load.get(key, 0)
                if load["ttft_p95_s"] is not None:
                    into["ttft_p95_s"] = max(into["ttft_p95_s"] or 0.0, load["ttft_p95_s"])
        return from_load(merged)


async def _addresses(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
