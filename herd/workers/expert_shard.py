"""An expert shard: owns some experts of every MoE layer and computes them for the trunk over gRPC.

It loads only its experts (memory in proportion to its share), serves herd.v1.ExpertShard (a
persistent Dispatch stream, plus Info), the standard grpc.health.v1 health service and reflection.
Every dispatch message is checked before any work: a bad one ends that stream with INVALID_ARGUMENT
and the reason, and the shard goes on serving other streams.

    herd expert-shard --model DIR --experts 0:8 --port 50061
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2

from herd.model.config import load_config
from herd.protos.herd.v1 import experts_pb2 as pb
from herd.protos.herd.v1 import experts_pb2_grpc as pb_grpc
from herd.workers.grpc_serving import add_health_and_reflection, listen, message_options
from herd.workers.shard_experts import ShardExperts
from herd.workers.wire import TO_WIRE, from_wire, to_wire

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 2**20
"""Room for a real step: 8192 tokens x 5120 hidden x 4 bytes is 168 MB a message."""
SERVICE = "herd.v1.ExpertShard"


class ExpertShardService(pb_grpc.ExpertShardServicer):
    """herd.v1.ExpertShard over one shard's experts (ShardExperts: the compute entry every transport calls)."""

    def __init__(self, model: str | Path, shard: ShardExperts) -> None:
        self.model = str(model)
        self.shard = shard
        self.config = load_config(model).text

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.ShardInfo:
        shard = self.shard
        return pb.ShardInfo(
            model=self.model, dtype=TO_WIRE[shard.dtype], experts=shard.experts, moe_layers=sorted(shard.layers),
            hidden_size=self.config.hidden_size, num_experts=self.config.num_local_experts,
            resident_expert_bytes=shard.resident_bytes,
        )

    def Dispatch(
        self, requests: Iterator[pb.DispatchRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.DispatchReply]:
        for request in requests:
            try:
                counts = list(request.counts)
                # The shape first: one whose element count wraps past int64 would pass the byte count in from_wire.
                self.shard.check(request.layer, counts, list(request.rows.shape))
                rows = from_wire(request.rows, name="rows")  # [R, H]
                start = time.perf_counter()
                out = self.shard.compute(request.layer, counts, rows, request.trace_context)
            except ValueError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            yield pb.DispatchReply(sequence=request.sequence, layer=request.layer, rows=to_wire(out),
                                   compute_seconds=time.perf_counter() - start)


def serve(
    model: str | Path,
    experts: Sequence[int],
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    dtype: torch.dtype = torch.float32,
    threads: int = 4,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int, ExpertShardService]:
    """Load the experts and start serving; returns the server, the bound port and the service.

    With `credentials` (herd.workers.shard_tls.ShardTls.server_credentials(): mutual TLS) the port is TLS
    only; a client without a certificate from the shards' CA is refused in the handshake."""
    service = ExpertShardService(model, ShardExperts.load(model, experts, dtype=dtype))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=message_options(MAX_MESSAGE_BYTES))
    pb_grpc.add_ExpertShardServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    add_health_and_reflection(server, SERVICE, health_servicer)
    bound = listen(server, host, port, credentials)
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("expert shard for experts %s of %s listening on %s:%d%s", list(service.shard.experts), model, host, bound,
             " (mutual TLS)" if credentials is not None else "")
    return server, bound, service


def parse_experts(spec: str, num_experts: int) -> list[int]:
    """'a:b' (a range) or '1,5,9' (a list) -> expert ids, checked against the model's expert count."""
    try:
        if ":" in spec:
            start, stop = (int(p) for p in spec.split(":", 1))
            ids = list(range(start, stop))
        else:
            ids = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--experts must be 'a:b' or a comma-separated list, got {spec!r}") from None
    bad = [e for e in ids if not 0 <= e < num_experts]
    if not ids or bad or len(set(ids)) != len(ids):
        raise ValueError(f"--experts {spec!r} must name distinct experts in 0..{num_experts - 1}")
    return ids
