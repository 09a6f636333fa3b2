"""An expert shard: owns some experts of every MoE layer and computes them for the trunk over gRPC.

It loads only its experts (memory in proportion to its share) and serves herd.v1.ExpertShard (a persistent
Dispatch stream, Info, and SetAdapter: the trunk's LoRA adapters, read from their paths, for its experts) and the
standard grpc.health.v1 health service; reflection only when asked (a shard is internal). Every dispatch message
is checked before any work: a bad one ends that stream with INVALID_ARGUMENT and the reason, and the shard goes on
serving other streams.

The server is asyncio, on a thread of its own, so a stream costs no thread while it waits: idle Dispatch
streams, a rogue client's, cannot take the threads the trunk's stream needs. The compute runs on that loop, one
message at a time (torch spreads each over its own threads): a hop to a thread pool and back cost 0.2 to 0.5 ms
a message on the 2-core machine, up to doubling a decode step's round trip. A stream that sends nothing within
`first_message_timeout_s` of opening is ended (the trunk sends its first message as it opens one). A message
may hold one step's rows (`max_message_bytes`), no more.

    herd expert-shard --model DIR --experts 0:8 --port 50061
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from herd.model.config import TextConfig, load_config
from herd.protos.herd.v1 import experts_pb2 as pb
from herd.protos.herd.v1 import experts_pb2_grpc as pb_grpc
from herd.workers.grpc_serving import LoopThread, add_health_and_reflection, listen, message_options
from herd.workers.shard_experts import AdapterAction, ShardExperts
from herd.workers.wire import TO_WIRE, from_wire, to_wire

log = logging.getLogger(__name__)

SERVICE = "herd.v1.ExpertShard"
DEFAULT_STEP_TOKENS = 8192
"""Tokens of the largest step a shard takes when not told its trunk's (`herd expert-shard --step-tokens`)."""
MESSAGE_HEADROOM_BYTES = 2**20
"""Room in a message beyond its rows: counts, shape, sequence, trace context."""
MAX_STREAMS_PER_CONNECTION = 16
"""HTTP/2 streams one connection may hold open (a trunk holds one Dispatch stream per shard, plus checks)."""
_SERVER_OPTIONS = [
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    # Ping a quiet connection, and drop it when the peer does not answer: a vanished client's streams go.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


def max_message_bytes(config: TextConfig, dtype: torch.dtype, step_tokens: int) -> int:
    """The largest Dispatch message (or reply) of a step of `step_tokens` tokens: each token's rows for its
    top-k experts, which may all be this shard's, [tokens x k, H] in `dtype`, plus the headroom."""
    rows = step_tokens * config.num_experts_per_tok
    return rows * config.hidden_size * dtype.itemsize + MESSAGE_HEADROOM_BYTES


class ExpertShardService(pb_grpc.ExpertShardServicer):
    """herd.v1.ExpertShard over one shard's experts (ShardExperts: the compute entry every transport calls)."""

    def __init__(self, model: str | Path, shard: ShardExperts, *, first_message_timeout_s: float = 10.0) -> None:
        self.model = str(model)
        self.shard = shard
        self.config = load_config(model).text
        self.first_message_timeout_s = first_message_timeout_s

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext[object, object]) -> pb.ShardInfo:
        shard = self.shard
        return pb.ShardInfo(
            model=self.model, dtype=TO_WIRE[shard.dtype], experts=shard.experts, moe_layers=sorted(shard.layers),
            hidden_size=self.config.hidden_size, num_experts=self.config.num_local_experts,
            resident_expert_bytes=shard.resident_bytes,
        )

    async def Dispatch(
        self, requests: AsyncIterator[pb.DispatchRequest], context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.DispatchReply]:
        incoming = aiter(requests)
        wait_s: float | None = self.first_message_timeout_s
        while True:
            try:
                request = await asyncio.wait_for(anext(incoming), wait_s)
            except StopAsyncIteration:
                return
            except TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no dispatch message within {wait_s:g} s of opening the stream")
            except DecodeError as err:  # else gRPC answers UNKNOWN, with a traceback logged per message
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {SERVICE} dispatch message: {err}")
            wait_s = None
            try:
                reply = self._step(request)
            except ValueError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            yield reply

    async def SetAdapter(self, request: pb.SetAdapterRequest,
                         context: grpc.aio.ServicerContext[object, object]) -> pb.SetAdapterReply:
        """Load (from its path) or empty a slot of the trunk's adapter bank; runs on the loop, between dispatches."""
        try:
            action = int(request.action)
            if action not in {a.value for a in AdapterAction}:
                raise ValueError(f"SetAdapter needs an action ({[a.name for a in AdapterAction]}), got {action}")
            self.shard.set_adapter(AdapterAction(action), request.slot, request.path, slots=request.slots,
                                   max_rank=request.max_rank)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return pb.SetAdapterReply()

    def _step(self, request: pb.DispatchRequest) -> pb.DispatchReply:
        counts = list(request.counts)
        # The shape first: one whose element count wraps past int64 would pass the byte count in from_wire.
        self.shard.check(request.layer, counts, list(request.rows.shape))
        rows = from_wire(request.rows, name="rows").to(self.shard.device)  # [R, H]
        row_slots = torch.tensor(list(request.row_slots), dtype=torch.int64) if request.row_slots else None  # [R]
        start = time.perf_counter()
        out = self.shard.compute(request.layer, counts, rows, request.trace_context, row_slots)
        return pb.DispatchReply(sequence=request.sequence, layer=request.layer, rows=to_wire(out),
                                compute_seconds=time.perf_counter() - start)


class ShardServer:
    """A running shard's asyncio gRPC server, stopped from any thread."""

    def __init__(self, loop: LoopThread, server: grpc.aio.Server, max_message_bytes: int) -> None:
        self._loop, self._server = loop, server
        self.max_message_bytes = max_message_bytes

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving (in-flight calls get `grace` seconds); the event is set once stopped."""
        return self._loop.run_then_stop(self._server.stop(grace))


def serve(
    model: str | Path,
    experts: Sequence[int],
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    credentials: grpc.ServerCredentials | None = None,
    step_tokens: int = DEFAULT_STEP_TOKENS,
    reflection: bool = False,
    first_message_timeout_s: float = 10.0,
) -> tuple[ShardServer, int, ExpertShardService]:
    """Load the experts and start serving; returns the server, the bound port and the service.

    With `credentials` (herd.workers.shard_tls.ShardTls.server_credentials(): mutual TLS) the port is TLS
    only; a client without a certificate from the shards' CA is refused in the handshake. `step_tokens` (the
    trunk's largest step) sizes the largest message taken; a larger one is RESOURCE_EXHAUSTED."""
    service = ExpertShardService(model, ShardExperts.load(model, experts, dtype=dtype, device=device),
                                 first_message_timeout_s=first_message_timeout_s)
    limit = max_message_bytes(service.config, dtype, step_tokens)
    loop = LoopThread(f"expert-shard-{host}:{port}")

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=[*message_options(limit), *_SERVER_OPTIONS])
        pb_grpc.add_ExpertShardServicer_to_server(service, server)
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs lacks aio
        add_health_and_reflection(server, SERVICE, health_servicer, reflection_on=reflection)
        bound = listen(server, host, port, credentials)
        await server.start()
        for name in ("", SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return server, bound

    server, bound = loop.run(start())
    log.info("expert shard for experts %s of %s listening on %s:%d%s (messages up to %d bytes)",
             list(service.shard.experts), model, host, bound, " (mutual TLS)" if credentials is not None else "",
             limit)
    return ShardServer(loop, server, limit), bound, service


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
