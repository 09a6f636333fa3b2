"""Where the control plane reads each model's load: the gateway in this process (with its replicas' KV use, from
their stats), or gateways over HTTP (their /herd/load, summed over the gateway pods; no KV use: a gateway outside
Ray reads no replica stats)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from herd.platform.controlplane.policy import ModelMetrics

if TYPE_CHECKING:
    from herd.platform.gateway.core import Gateway


class MetricsSource(Protocol):
    async def read(self) -> dict[str, ModelMetrics]: ...


_SUMMED = ("in_flight", "in_flight_tokens", "waiting_for_replica", "awaiting_first_token", "refused_cold",
           "output_tokens_per_s")
_WORST = ("ttft_p95_s", "itl_p95_s")


def from_load(load: dict[str, dict[str, Any]]) -> dict[str, ModelMetrics]:
    """Gateway load snapshots (herd.platform.gateway.load.LoadTracker.snapshot) as policy inputs: what is
    held for a replica is queued, the rest of what is in flight runs (or waits in Serve's queue)."""
    return {name: ModelMetrics(running=int(v["in_flight"] - v["waiting_for_replica"]),
                               queued=int(v["waiting_for_replica"]), in_flight_tokens=int(v["in_flight_tokens"]),
                               awaiting_first_token=int(v.get("awaiting_first_token") or 0),
                               refused_cold=int(v["refused_cold"]), ttft_p95_s=v["ttft_p95_s"],
                               itl_p95_s=v.get("itl_p95_s"), output_tokens_per_s=float(v["output_tokens_per_s"]))
            for name, v in load.items()}


def kv_use(stats: Mapping[str, int]) -> float | None:
    """A replica's KV use from its stats (herd.workers.replica_core.ReplicaCore.stats; a disaggregated model's are
    a decode replica's): the fullest layer group's blocks in use of its blocks; None when the stats have none."""
    uses = [stats[f"kv_blocks_used_{key.removeprefix('kv_blocks_total_')}"] / total
            for key, total in stats.items()
            if key.startswith("kv_blocks_total_") and total > 0
            and f"kv_blocks_used_{key.removeprefix('kv_blocks_total_')}" in stats]
    return max(uses) if uses else None


class GatewayLoadSource:
    """The gateway running in this process (herd serve), with the KV use of the models in `kv_models` (those whose
    policy reads it: a disaggregated model's decode pool)."""

    STATS_TIMEOUT_S = 2.0

    def __init__(self, gateway: Gateway, kv_models: Sequence[str] = ()) -> None:
        self.gateway = gateway
        self.kv_models = list(kv_models)

    async def read(self) -> dict[str, ModelMetrics]:
        """The load of every model; a KV model's KV use is that of the replica Serve's router picks to answer
        (the replicas' loads are balanced); one that does not answer in time leaves it unread this round."""
        loads = from_load(self.gateway.load.snapshot())
        uses = await asyncio.gather(*(self._kv_use(name) for name in self.kv_models))
        for name, use in zip(self.kv_models, uses, strict=True):
            if use is not None:
                loads[name] = replace(loads.get(name, ModelMetrics()), kv_use=use)
        return loads

    async def _kv_use(self, model: str) -> float | None:
        try:
            return kv_use(await asyncio.wait_for(self.gateway.backends[model].stats(), self.STATS_TIMEOUT_S))
        except Exception:  # a replica restarting or unreachable: no KV signal this round
            return None


class HttpLoadSource:
    """Gateways elsewhere: requests, tokens and refusals add up over gateways; TTFT and ITL p95 take the worst.
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
                into = merged.setdefault(model, {**dict.fromkeys(_SUMMED, 0), **dict.fromkeys(_WORST)})
                for key in _SUMMED:
                    into[key] += load.get(key, 0)
                for key in _WORST:
                    if load.get(key) is not None:
                        into[key] = max(into[key] or 0.0, load[key])
        return from_load(merged)


async def _addresses(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
