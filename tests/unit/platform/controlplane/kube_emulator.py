"""An in-memory Kubernetes API (kmock 0.8) on loopback, in its own thread, for the official client.

Covers kmock's gaps in the fixture (not in the controller): RayService is declared as a resource, and
objects are created with an explicit namespace.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kmock
from kubernetes import client


@contextmanager
def kube_api() -> Iterator[tuple[client.ApiClient, Any]]:
    """(an ApiClient pointed at the emulator, the emulator for assertions)."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
                emulator.resources["ray.io/v1/rayservices"] = {"kind": "RayService", "namespaced": True}
                box.update(emulator=emulator, url=str(server.url).rstrip("/"), loop=asyncio.get_running_loop(),
                           stop=asyncio.Event())
                ready.set()
                await box["stop"].wait()

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30), "kmock did not start"
    configuration = client.Configuration()
    configuration.host = box["url"]
    api = client.ApiClient(configuration)
    try:
        yield api, box["emulator"]
    finally:
        api.close()
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(timeout=10)


def patches(emulator: Any) -> list[tuple[str, str, Any]]:
    """(url path, content type, body) of every PATCH the emulator received, in order."""
    return [(r.url.path, r.headers.get("Content-Type"), r.data) for r in list(emulator._requests)
            if str(r.method).upper().endswith("PATCH")]
