"""What an expert shard shows the network: no reflection unless asked, messages no larger than a step needs,
and idle Dispatch streams (a rogue client's) that cost no thread, so the trunk's stream is always served."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from herd.model import load_config
from herd.model.tiny import make_tiny
from herd.protos.herd.v1 import experts_pb2 as pb
from herd.protos.herd.v1 import experts_pb2_grpc as pb_grpc
from herd.workers.expert_shard import SERVICE, max_message_bytes, serve
from herd.workers.grpc_transport import GrpcTransport
from herd.workers.transport import ShardWork
from herd.workers.wire import to_wire

EXPERTS = [0, 1, 2, 3]
STEP_TOKENS = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), preset="scout", seed=3)


@pytest.fixture(scope="module")
def shard(tiny):
    server, port, service = serve(tiny, EXPERTS, step_tokens=STEP_TOKENS)
    yield server, f"127.0.0.1:{port}", service
    server.stop(0).wait()


def _services(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_is_off_unless_asked(tiny, shard):
    _, address, _ = shard
    with pytest.raises(grpc.RpcError) as info:
        _services(address)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    server, port, _ = serve(tiny, EXPERTS, reflection=True)
    try:
        assert SERVICE in _services(f"127.0.0.1:{port}")
    finally:
        server.stop(0).wait()


def test_the_message_limit_is_a_steps_rows_with_headroom(tiny):
    text = load_config(tiny).text
    rows = STEP_TOKENS * text.num_experts_per_tok
    assert max_message_bytes(text, torch.float32, STEP_TOKENS) == rows * text.hidden_size * 4 + 2**20
    # Scout's real shape in bf16 at 8192 tokens a step: 80 MiB of rows, far under the old fixed 512 MiB.
    scout = text.model_copy(update={"hidden_size": 5120, "num_experts_per_tok": 1})
    assert max_message_bytes(scout, torch.bfloat16, 8192) == 8192 * 5120 * 2 + 2**20


def test_a_message_over_the_limit_is_resource_exhausted(shard):
    server, address, service = shard
    hidden = service.config.hidden_size
    too_many = server.max_message_bytes // (hidden * 4) + 1
    request = pb.DispatchRequest(sequence=1, layer=1, counts=[too_many, 0, 0, 0],
                                 rows=to_wire(torch.zeros(too_many, hidden)))
    assert request.ByteSize() > server.max_message_bytes
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.ExpertShardStub(channel).Dispatch(iter([request]), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()


def _idle(release: threading.Event) -> Iterator[pb.DispatchRequest]:
    release.wait()
    yield from ()


def test_idle_streams_of_a_rogue_client_do_not_starve_the_trunk(tiny):
    """Twelve streams that never send (the old shard had 4 threads, one held per stream): the trunk's Info and
    Dispatch are still answered within its deadline."""
    server, port, service = serve(tiny, EXPERTS, first_message_timeout_s=600)
    address = f"127.0.0.1:{port}"
    release = threading.Event()
    rogue = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(rogue).result(timeout=30)
        stub = pb_grpc.ExpertShardStub(rogue)
        calls = [stub.Dispatch(_idle(release)) for _ in range(12)]
        transport = GrpcTransport([address], timeout_s=10)
        rows = torch.randn(3, service.config.hidden_size)
        out = transport.run(1, [ShardWork(counts=[1, 1, 1, 0], rows=rows)])
        assert out[0].shape == rows.shape
        transport.close()
    finally:
        release.set()
        for call in calls:
            call.cancel()
        rogue.close()
        server.stop(0).wait()


def test_a_stream_that_sends_nothing_is_ended(tiny):
    server, port, _ = serve(tiny, EXPERTS, first_message_timeout_s=0.2)
    release = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.ExpertShardStub(channel).Dispatch(_idle(release), timeout=60))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no dispatch message" in info.value.details()
    finally:
        release.set()
        server.stop(0).wait()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.2", "::", "shard.example"])
def test_the_cli_listens_beyond_loopback_only_with_tls(tmp_path, capsys, host):
    from herd.cli import main

    assert main(["expert-shard", "--model", str(tmp_path), "--experts", "0:2", "--host", host]) == 2
    assert "reachable from the network: a shard there needs mutual TLS" in capsys.readouterr().err


def test_a_dispatch_a_shard_refuses_is_the_replicas_fault_not_the_clients(shard):
    """A shard's INVALID_ARGUMENT means the trunk built a bad dispatch: the replica reports INTERNAL (the gateway
    then answers a generic 500 with the request id), never a 400 that shows the shard's address to a client."""
    from herd.engine.errors import Code, HerdError

    _, address, service = shard
    transport = GrpcTransport([address], timeout_s=10)
    try:
        rows = torch.randn(3, service.config.hidden_size)
        with pytest.raises(HerdError) as refused:
            transport.run(1, [ShardWork(counts=[5, 0, 0, 0], rows=rows)])  # counts say 5 rows, 3 are sent
        assert refused.value.code is Code.INTERNAL, refused.value
    finally:
        transport.close()
