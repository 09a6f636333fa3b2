"""One expert shard server in this process: what it computes, and how it refuses bad messages."""

from __future__ import annotations

import re

import grpc
import pytest
import torch

from herd import kernels
from herd.model import load_experts
from herd.model.tiny import make_tiny
from herd.protos.herd.v1 import experts_pb2 as pb
from herd.protos.herd.v1 import experts_pb2_grpc as pb_grpc
from herd.workers.expert_shard import parse_experts, serve
from herd.workers.wire import from_wire, to_wire


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("tiny"), preset="scout", seed=5)
    server, port, service = serve(path, [4, 5, 6, 7])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield path, pb_grpc.ExpertShardStub(channel), service
    channel.close()
    server.stop(0)


def _request(counts, rows, layer=1):
    return pb.DispatchRequest(sequence=1, layer=layer, counts=counts, rows=to_wire(rows))


def test_info_and_results_equal_the_local_kernel(shard):
    path, stub, _service = shard
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert list(info.experts) == [4, 5, 6, 7] and list(info.moe_layers) == [0, 1, 2, 3]
    weights = load_experts(path, [4, 5, 6, 7])[2]
    expert_bytes = (weights.gate_up[0].nbytes + weights.down[0].nbytes) * 4 * 4  # 4 experts x 4 layers
    assert info.resident_expert_bytes == expert_bytes
    rows = torch.randn(9, info.hidden_size)
    replies = list(stub.Dispatch(iter([_request([2, 0, 3, 4], rows, layer=2)] * 2), timeout=10))
    expected = kernels.experts(rows, torch.tensor([0, 2, 2, 5, 9]), weights.gate_up, weights.down)
    assert len(replies) == 2
    for reply in replies:
        assert reply.layer == 2 and reply.sequence == 1
        torch.testing.assert_close(from_wire(reply.rows), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda h: _request([1, 0, 0, 0], torch.randn(1, h), layer=9), "layer 9 is not a MoE layer"),
        (lambda h: _request([1, 1, 0, 0], torch.randn(3, h)), "counts sum to 2 but 3 rows"),
        (lambda h: _request([1, 0, 0], torch.randn(1, h)), "counts has 3 entries; this shard owns 4"),
        (lambda h: _request([1, 0, 0, 0], torch.randn(1, h).bfloat16()), "this shard computes in torch.float32"),
        (lambda h: _request([1, 0, 0, 0], torch.randn(1, h + 1)), "rows must be"),
        (lambda h: pb.DispatchRequest(layer=1, counts=[1, 0, 0, 0], rows=pb.Tensor(
            dtype=pb.DTYPE_FLOAT32, shape=[1, h], data=b"\0" * (4 * h - 3))), "needs .* bytes"),
    ],
)
def test_malformed_dispatch_is_invalid_argument_and_the_shard_keeps_serving(shard, build, message):
    _, stub, _ = shard
    hidden = stub.Info(pb.InfoRequest(), timeout=10).hidden_size
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Dispatch(iter([build(hidden)]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, info.value.details()), info.value.details()
    ok = list(stub.Dispatch(iter([_request([1, 0, 0, 0], torch.randn(1, hidden))]), timeout=10))
    assert len(ok) == 1


def test_expert_specs():
    assert parse_experts("4:8", 16) == [4, 5, 6, 7]
    assert parse_experts("1,5,9", 16) == [1, 5, 9]
    for bad in ("8:4", "0:17", "x", "1,1", ""):
        with pytest.raises(ValueError, match="--experts"):
            parse_experts(bad, 16)
