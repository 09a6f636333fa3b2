"""Expert shards reached over gRPC: one persistent herd.v1.ExpertShard Dispatch stream per shard.

LoRA: each DispatchRequest carries its rows' slots (row_slots) when an adapter covers the layer's experts; the
adapters themselves go by path in SetAdapter calls between steps, and each shard reads them.

With ShardTls credentials the traffic is mutual TLS: each shard and the trunk present one certificate and
accept only a peer whose certificate the same CA signed.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herd.engine.errors import Code, HerdError
from herd.model.lora import LoRAAdapter
from herd.protos.herd.v1 import experts_pb2 as pb
from herd.protos.herd.v1 import experts_pb2_grpc as pb_grpc
from herd.workers.expert_shard import SERVICE
from herd.workers.grpc_serving import message_options
from herd.workers.transport import ShardWork, TransportStats
from herd.workers.wire import from_wire, to_wire

DEFAULT_MAX_MESSAGE_BYTES = 512 * 2**20
"""The largest message either way when the caller does not pass its shards' own limit (a replica does:
herd.workers.expert_shard.max_message_bytes of its engine's largest step)."""


class GrpcTransport:
    """One persistent Dispatch stream per shard; every layer's messages go out to all shards at once.

    submit sends, the function it returns receives: the caller computes while the shards do (issue 21).

    With `credentials` (ShardTls.channel_credentials(), or any grpc channel credentials) the channels are
    TLS; `server_name` is the name checked in the shards' certificates instead of their addresses.
    """

    def __init__(self, addresses: list[str], *, timeout_s: float = 30.0,
                 credentials: grpc.ChannelCredentials | None = None, server_name: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.timeout_s = timeout_s
        self.stats = TransportStats()
        self._channel = (credentials, server_name, max_message_bytes)
        self.streams = [_ShardStream(address, timeout_s, *self._channel) for address in addresses]
        self.infos = [s.info() for s in self.streams]

    def reconnect(self, index: int, address: str) -> None:
        """Between steps: shard `index` serves at `address` from now on (restarted in place, on a new port); a
        HerdError if it cannot be reached, ValueError unless it holds the experts it held."""
        stream = _ShardStream(address, self.timeout_s, *self._channel)
        try:
            info = stream.info()
            if tuple(info.experts) != tuple(self.infos[index].experts):
                raise ValueError(f"the expert shard at {address} holds experts {list(info.experts)}, shard {index} "
                                 f"held {list(self.infos[index].experts)}")
        except BaseException:
            stream.close()
            raise
        old, self.streams[index], self.infos[index] = self.streams[index], stream, info
        old.close()

    def shard_experts(self) -> list[tuple[int, ...]]:
        return [tuple(info.experts) for info in self.infos]

    def submit(self, layer: int, work: list[ShardWork]) -> Callable[[], list[torch.Tensor]]:
        """Serialise and send every shard's rows now; the function receives and deserialises the replies."""
        start = time.perf_counter()
        sent: list[int | None] = []  # each shard's message sequence; None: no rows for it this layer
        for stream, item in zip(self.streams, work, strict=True):
            if item.rows.shape[0]:
                sent.append(stream.send(layer, item.counts, to_wire(item.rows), item.trace_context, item.row_slots))
            else:
                sent.append(None)
        self.stats.serialize_s += time.perf_counter() - start
        return lambda: self._receive(work, sent)

    def run(self, layer: int, work: list[ShardWork]) -> list[torch.Tensor]:
        return self.submit(layer, work)()

    def _receive(self, work: list[ShardWork], sent: list[int | None]) -> list[torch.Tensor]:
        waited = time.perf_counter()
        replies = [s.receive(seq) if seq is not None else None for s, seq in zip(self.streams, sent, strict=True)]
        received = time.perf_counter()
        outputs = [
            from_wire(reply.rows, name="reply rows").to(item.rows.device) if reply is not None else item.rows.clone()
            for reply, item in zip(replies, work, strict=True)
        ]
        done = time.perf_counter()
        self.stats.calls += 1
        self.stats.wait_s += received - waited  # only the time blocked here: not what the caller's work hid
        self.stats.deserialize_s += done - received
        self.stats.compute_s += max((r.compute_seconds for r in replies if r is not None), default=0.0)
        return outputs

    def load_adapter(self, slot: int, adapter: LoRAAdapter, *, slots: int, max_rank: int) -> None:
        """Every shard reads the adapter from its path (SetAdapter)."""
        self._set_adapter(pb.SetAdapterRequest(action=pb.ADAPTER_ACTION_LOAD, slot=slot, path=str(adapter.path),
                                               slots=slots, max_rank=max_rank))

    def unload_adapter(self, slot: int) -> None:
        self._set_adapter(pb.SetAdapterRequest(action=pb.ADAPTER_ACTION_UNLOAD, slot=slot))

    def check_adapter(self, adapter: LoRAAdapter) -> None:
        self._set_adapter(pb.SetAdapterRequest(action=pb.ADAPTER_ACTION_CHECK, path=str(adapter.path)))

    def _set_adapter(self, request: pb.SetAdapterRequest) -> None:
        for stream in self.streams:
            stream.set_adapter(request)

    def healthy(self) -> bool:
        return all(s.healthy() for s in self.streams)

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


class _ShardStream:
    """A Dispatch stream to one shard: requests through a queue, replies read by a thread.

    After a failure the stream is rebuilt on the next send; the channel reconnects by itself when
    the shard is back.
    """

    def __init__(self, address: str, timeout_s: float, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.address = address
        self.timeout_s = timeout_s
        options: list[tuple[str, int | str]] = [
            *message_options(max_message_bytes),
            # A restarted shard is found again within a second, not after gRPC's default backoff (up to 2 min).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.stub = pb_grpc.ExpertShardStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._sequence = itertools.count(1)
        self._requests: queue.Queue[pb.DispatchRequest | None] | None = None
        self._replies: queue.Queue[pb.DispatchReply | grpc.RpcError] = queue.Queue()
        self._call: grpc.Future[pb.DispatchReply] | None = None  # the Dispatch call, to cancel it
        self._lock = threading.Lock()

    def info(self) -> pb.ShardInfo:
        """The shard's Info, waiting up to timeout_s for it to come up. A channel that never connected
        (nothing listening, a TLS handshake refused) is UNAVAILABLE, with gRPC's reason, not a deadline."""
        try:
            info: pb.ShardInfo = self.stub.Info(pb.InfoRequest(), timeout=self.timeout_s, wait_for_ready=True)
            return info
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                try:  # without waiting for the channel: fails at once with why it cannot connect
                    info = self.stub.Info(pb.InfoRequest(), timeout=min(self.timeout_s, 2.0))
                    return info
                except grpc.RpcError as probe:
                    err = probe
            raise HerdError(shard_code(err.code().name), f"expert shard at {self.address}: {err.details()}") from err

    def send(self, layer: int, counts: list[int], rows: pb.Tensor, trace_context: dict[str, str] | None = None,
             row_slots: torch.Tensor | None = None) -> int:
        slots = row_slots.tolist() if row_slots is not None else []
        with self._lock:
            if self._requests is None:
                self._open()
            assert self._requests is not None
            sequence = next(self._sequence)
            self._requests.put(pb.DispatchRequest(sequence=sequence, layer=layer, counts=counts, rows=rows,
                                                  trace_context=trace_context or {}, row_slots=slots))
        return sequence

    def set_adapter(self, request: pb.SetAdapterRequest) -> None:
        """SetAdapter; a shard that refuses or cannot be reached is a HerdError naming the adapter."""
        try:
            self.stub.SetAdapter(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            what = f"adapter {request.path!r}" if request.path else f"slot {request.slot}"
            raise HerdError(shard_code(err.code().name),
                            f"expert shard at {self.address} could not {pb.AdapterAction.Name(request.action)} {what}: "
                            f"{err.details()}") from err

    def receive(self, sequence: int) -> pb.DispatchReply:
        """The reply to message `sequence`. Replies to earlier messages still queued are skipped: a step that failed
        at another shard left this one's reply unread (the engine holds that step and sends it again)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                reply = self._replies.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                self._break()
                raise HerdError(Code.DEADLINE_EXCEEDED,
                                f"expert shard at {self.address} did not answer within {self.timeout_s:g} s") from None
            if isinstance(reply, grpc.RpcError):
                self._break()
                code = reply.code().name if reply.code() is not None else "UNAVAILABLE"
                raise HerdError(shard_code(code), f"expert shard at {self.address}: {reply.details()}")
            if reply.sequence >= sequence:
                break
        if reply.sequence != sequence:
            self._break()
            raise HerdError(Code.INTERNAL,
                            f"expert shard at {self.address} answered message {reply.sequence}, not {sequence}")
        return reply

    def healthy(self) -> bool:
        """SERVING by the standard health service, waiting up to 2 s for the channel to (re)connect."""
        try:
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            answer: health_pb2.HealthCheckResponse = self.health.Check(request, timeout=2.0, wait_for_ready=True)
        except grpc.RpcError:
            return False
        # bool(): grpc-stubs' grpc_health package shadows health_pb2's own .pyi with a module __getattr__ -> Any.
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self._break()
        self.channel.close()

    def _open(self) -> None:
        requests: queue.Queue[pb.DispatchRequest | None] = queue.Queue()
        replies: queue.Queue[pb.DispatchReply | grpc.RpcError] = queue.Queue()

        def outgoing() -> Iterator[pb.DispatchRequest]:
            while (message := requests.get()) is not None:
                yield message

        call = self.stub.Dispatch(outgoing())

        def incoming() -> None:
            try:
                for reply in call:
                    replies.put(reply)
            except grpc.RpcError as err:
                replies.put(err)

        threading.Thread(target=incoming, name=f"shard-{self.address}", daemon=True).start()
        self._requests, self._replies, self._call = requests, replies, call

    def _break(self) -> None:
        with self._lock:
            if self._requests is not None:
                self._requests.put(None)
            if self._call is not None:
                self._call.cancel()
            self._requests, self._call = None, None
            self._replies = queue.Queue()


def shard_code(name: str) -> Code:
    """The replica's code for a shard's gRPC status: a shard gone or slow is UNAVAILABLE or DEADLINE_EXCEEDED
    (worth a retry); anything else it refuses was built by the trunk, so it is the replica's own fault
    (INTERNAL), never the client's (a shard's INVALID_ARGUMENT is not a 400)."""
    code = Code.of(name)
    return code if code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED) else Code.INTERNAL
