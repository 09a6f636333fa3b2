"""Per-request speculation on and off through both doors to a real replica: the OpenAI doors' `speculative`
extension field (a JSON boolean, default true) and herd.v1's SamplingOptions.speculative reach the engine's
SamplingParams; anything but a boolean is a 400 naming the field."""

from __future__ import annotations

import pytest

from herd.engine.sampling_params import SamplingParams
from herd.platform.gateway.sampling_limits import check_sampling
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.unit.platform.gateway.asgi import post as _post
from tests.unit.platform.gateway.test_grpc_server import _with_server

DOORS = {
    "/v1/completions": {"model": "scout", "prompt": "the herd", "max_tokens": 2, "temperature": 0},
    "/v1/chat/completions": {"model": "scout", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                             "temperature": 0},
}


@pytest.fixture
def engine_params(core, monkeypatch):
    """The SamplingParams of every request the replica hands its engine, in order."""
    seen: list[SamplingParams] = []
    generate = core.engine.generate

    def spy(prompt, params, **kwargs):
        seen.append(params)
        return generate(prompt, params, **kwargs)

    monkeypatch.setattr(core.engine, "generate", spy)
    return seen


@pytest.mark.parametrize("path", sorted(DOORS))
@pytest.mark.parametrize(("extra", "expected"), [({}, True), ({"speculative": True}, True),
                                                 ({"speculative": False}, False)])
def test_http_speculative_reaches_the_engine(gateway, engine_params, path, extra, expected):
    reply = _post(gateway, path, {**DOORS[path], **extra})
    assert reply.status_code == 200, reply.text
    assert [p.speculative for p in engine_params] == [expected]


@pytest.mark.parametrize("path", sorted(DOORS))
@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, [True]])
def test_http_speculative_not_a_boolean_is_400_naming_it(gateway, engine_params, path, value):
    reply = _post(gateway, path, {**DOORS[path], "speculative": value})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert "speculative" in (error["param"] or "") + error["message"]
    assert engine_params == [], "refused before any work"


def test_grpc_speculative_reaches_the_engine_true_false_and_absent(gateway, engine_params):
    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        for options in (pb.SamplingOptions(max_tokens=2, temperature=0),
                        pb.SamplingOptions(max_tokens=2, temperature=0, speculative=True),
                        pb.SamplingOptions(max_tokens=2, temperature=0, speculative=False)):
            request = pb.GenerateRequest(model="scout", text="the herd", sampling=options)
            chunks = [c async for c in stub.Generate(request)]
            assert chunks[-1].finish_reason

    _with_server(gateway, body)
    assert [p.speculative for p in engine_params] == [True, True, False]


def test_the_gateways_sampling_check_takes_speculative_both_ways():
    """The gateway checks options by building SamplingParams from every field set on the wire: the new field
    must be one SamplingParams knows, or every request that sets it would be refused."""
    for value in (True, False):
        check_sampling(pb.SamplingOptions(max_tokens=2, speculative=value))


def test_the_wire_carries_only_a_boolean():
    """herd.v1's field is typed: a client cannot set anything else (nothing for the gateway to refuse)."""
    with pytest.raises(TypeError):
        pb.SamplingOptions(speculative="yes")  # type: ignore[arg-type]
