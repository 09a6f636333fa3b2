"""hypothesis at an expert shard's Dispatch stream: well-formed messages with random fields, and bytes.

Every stream must end with OK (every reply the right rows) or INVALID_ARGUMENT naming what is wrong; a
message the shard cannot even parse may be refused by gRPC itself (INTERNAL). Never UNKNOWN (an
exception the service did not turn into a status), never a hang; afterwards the shard answers a good
message with the reference result.
"""

from __future__ import annotations

import collections
import itertools

import grpc
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from herd import kernels
from herd.model import load_experts
from herd.model.tiny import make_tiny
from herd.protos.herd.v1 import experts_pb2 as pb
from herd.protos.herd.v1 import experts_pb2_grpc as pb_grpc
from herd.workers.expert_shard import serve
from herd.workers.wire import from_wire, to_wire

EXPERTS = [4, 5, 6, 7]
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
FUZZ = settings(max_examples=500, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))
TIMEOUT_S = 20  # a stream that outlives this is a hang, and fails the test


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("tiny"), preset="scout", seed=5)
    server, port, service = serve(path, EXPERTS)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield path, channel, service
    channel.close()
    server.stop(0)


@st.composite
def dispatch_requests(draw, hidden: int):
    """A well-formed message with random values (NaN and infinities among them), or one with a field spoiled."""
    counts = draw(st.lists(st.integers(0, 3), min_size=len(EXPERTS), max_size=len(EXPERTS)))
    scale = draw(st.sampled_from([1.0, 1e-30, 1e30, float("inf"), float("nan")]))
    values = torch.randn(sum(counts), hidden) * scale  # [R, H]
    fields = {"layer": draw(st.integers(0, 3)), "counts": counts, "dtype": pb.DTYPE_FLOAT32,
              "shape": list(values.shape), "data": values.numpy().tobytes()}
    spoiled = draw(st.sampled_from([None, None, None, "layer", "counts", "dtype", "shape", "wrapped", "data"]))
    if spoiled == "layer":
        fields["layer"] = draw(st.one_of(st.integers(-1, 5), INT32))
    elif spoiled == "counts":
        fields["counts"] = draw(st.lists(st.one_of(st.integers(-3, 5), INT32), max_size=6))
    elif spoiled == "dtype":
        fields["dtype"] = draw(st.sampled_from([pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT16, pb.DTYPE_UNSPECIFIED, 7, -1]))
    elif spoiled == "shape":
        fields["shape"] = draw(st.one_of(
            st.lists(st.one_of(st.integers(-2, 2 * hidden), INT64), max_size=4),
            st.tuples(st.integers(-1, 20), st.just(hidden)).map(list),
        ))
    elif spoiled == "wrapped":  # an element count past int64 wraps to 0: "no bytes needed" to a naive check
        fields["shape"], fields["data"] = [2 ** draw(st.integers(57, 62)), hidden], b""
    elif spoiled == "data":
        fields["data"] = draw(st.one_of(st.binary(max_size=64), st.just(fields["data"][:-1]),
                                        st.just(fields["data"] + b"\0")))
    return pb.DispatchRequest(
        sequence=draw(st.integers(0, 2**64 - 1)),
        layer=fields["layer"],
        counts=fields["counts"],
        rows=pb.Tensor(dtype=fields["dtype"], shape=fields["shape"], data=fields["data"]),
        trace_context=draw(st.dictionaries(st.sampled_from(["traceparent", "tracestate", "x"]), st.text(max_size=60),
                                           max_size=2)),
    )


def _good(hidden: int, counts=(2, 0, 1, 1), layer: int = 1) -> tuple[pb.DispatchRequest, torch.Tensor]:
    rows = torch.randn(sum(counts), hidden)
    return pb.DispatchRequest(sequence=7, layer=layer, counts=list(counts), rows=to_wire(rows)), rows


def _still_right(shard, hidden: int) -> None:
    path, channel, _ = shard
    request, rows = _good(hidden, layer=2)
    weights = load_experts(path, EXPERTS)[2]
    expected = kernels.experts(rows, torch.tensor([0, 2, 2, 3, 4]), weights.gate_up, weights.down)
    replies = list(pb_grpc.ExpertShardStub(channel).Dispatch(iter([request]), timeout=TIMEOUT_S))
    assert len(replies) == 1 and replies[0].sequence == 7
    torch.testing.assert_close(from_wire(replies[0].rows), expected, rtol=0, atol=0)


def test_random_dispatch_messages_end_in_ok_or_invalid_argument(shard):
    path, channel, service = shard
    stub = pb_grpc.ExpertShardStub(channel)
    hidden = service.config.hidden_size
    weights = load_experts(path, EXPERTS)
    codes: collections.Counter[str] = collections.Counter()

    @FUZZ
    @given(st.lists(dispatch_requests(hidden), min_size=1, max_size=3))
    def run(requests):
        replies = []
        try:
            for reply in stub.Dispatch(iter(requests), timeout=TIMEOUT_S):
                replies.append(reply)
        except grpc.RpcError as err:
            codes[err.code().name] += 1
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details(), requests)
            assert err.details()
            assert len(replies) < len(requests)
            return
        codes["OK"] += 1
        assert [r.sequence for r in replies] == [r.sequence for r in requests]
        for request, reply in zip(requests, replies, strict=True):
            offsets = torch.tensor([0, *itertools.accumulate(request.counts)])
            layer = weights[request.layer]
            expected = kernels.experts(from_wire(request.rows), offsets, layer.gate_up, layer.down)
            torch.testing.assert_close(from_wire(reply.rows), expected, rtol=0, atol=0, equal_nan=True)

    run()
    print(f"dispatch fuzz: {dict(codes)}")
    assert codes["OK"] > 0 and codes["INVALID_ARGUMENT"] > 0, codes
    _still_right(shard, hidden)


def test_corrupt_bytes_on_the_dispatch_stream_are_refused_and_the_shard_serves_on(shard):
    _, channel, service = shard
    hidden = service.config.hidden_size
    raw = channel.stream_stream("/herd.v1.ExpertShard/Dispatch", request_serializer=None, response_deserializer=None)
    valid = _good(hidden)[0].SerializeToString()
    codes: collections.Counter[str] = collections.Counter()

    def flipped(at_and_byte):
        at, byte = at_and_byte
        at %= len(valid)
        return valid[:at] + bytes([byte]) + valid[at + 1:]

    corrupt = st.one_of(st.binary(max_size=300), st.tuples(st.integers(0, 10**6), st.integers(0, 255)).map(flipped),
                        st.integers(1, len(valid) - 1).map(lambda n: valid[:n]))

    @FUZZ
    @given(st.lists(corrupt, min_size=1, max_size=3))
    def run(messages):
        try:
            got = list(raw(iter(messages), timeout=TIMEOUT_S))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.INTERNAL:  # gRPC's own parser refused the bytes, before the service
                assert "deserializ" in err.details().lower(), err.details()
                codes["INTERNAL (gRPC's parser)"] += 1
            else:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
                codes[err.code().name] += 1
            return
        codes["OK"] += 1
        assert len(got) == len(messages)

    run()
    print(f"corrupt dispatch bytes: {dict(codes)}")
    assert codes["INVALID_ARGUMENT"] > 0, codes
    info = pb_grpc.ExpertShardStub(channel).Info(pb.InfoRequest(), timeout=TIMEOUT_S)
    assert list(info.experts) == EXPERTS
    _still_right(shard, hidden)


def test_element_counts_past_int64_are_invalid_argument(shard):
    """A shape whose element count wraps past int64 looks, to torch, like an empty tensor (or a small one)."""
    _, channel, service = shard
    hidden = service.config.hidden_size
    stub = pb_grpc.ExpertShardStub(channel)
    for shape, data in (([2**58, hidden], b""), ([2**62 + 1, 4], b"\0" * 16), ([2**40, 2**40], b"")):
        request = pb.DispatchRequest(layer=1, counts=[1, 0, 0, 0], rows=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape,
                                                                                  data=data))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Dispatch(iter([request]), timeout=TIMEOUT_S))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "rows" in info.value.details()
    _still_right(shard, hidden)
