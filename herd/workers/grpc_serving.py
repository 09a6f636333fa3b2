"""What every gRPC server of Herd sets up the same way (the expert shards' and the gateway's Inference door):
message size limits, one port (TLS when given credentials), the standard health service and reflection."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel and server options that let messages of up to max_message_bytes through, both ways."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def add_health_and_reflection(server: grpc.Server | grpc.aio.Server, service: str, health_servicer: Any) -> None:
    """grpc.health.v1 (the given servicer, sync or asyncio) and reflection for `service` and themselves."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)


def listen(server: grpc.Server | grpc.aio.Server, host: str, port: int,
           credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind host:port (0: a free port), TLS only when `credentials` are given; the port bound, or OSError."""
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if not bound:
        raise OSError(f"cannot listen on {address}")
    return bound
