"""What every gRPC server of Herd sets up the same way (the expert shards' and the gateway's Inference door):
message size limits, one port (TLS when given credentials), the standard health service and reflection; and
an asyncio loop on a thread of its own, for an asyncio server whose owner is synchronous code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

T = TypeVar("T")


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel and server options that let messages of up to max_message_bytes through, both ways."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def add_health_and_reflection(server: grpc.Server | grpc.aio.Server, service: str, health_servicer: Any, *,
                              reflection_on: bool = True) -> None:
    """grpc.health.v1 (the given servicer, sync or asyncio), and reflection for `service` and themselves unless
    `reflection_on` is False (an internal server shows no one its methods)."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_on:
        reflection.enable_server_reflection((service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)


def listen(server: grpc.Server | grpc.aio.Server, host: str, port: int,
           credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind host:port (0: a free port), TLS only when `credentials` are given; the port bound, or OSError."""
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if not bound:
        raise OSError(f"cannot listen on {address}")
    return bound


class LoopThread:
    """An asyncio event loop running on a daemon thread of its own; sync code hands it coroutines."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result (or its exception)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def run_then_stop(self, coroutine: Coroutine[Any, Any, object]) -> threading.Event:
        """Run `coroutine`, then stop the loop; the event is set once the coroutine is done."""
        done = threading.Event()

        def finished(_: object) -> None:
            done.set()
            self.loop.call_soon_threadsafe(self.loop.stop)

        asyncio.run_coroutine_threadsafe(coroutine, self.loop).add_done_callback(finished)
        return done
