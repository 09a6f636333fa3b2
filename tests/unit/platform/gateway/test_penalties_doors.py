"""Penalties, logit_bias and min_tokens through both doors to a real replica: OpenAI's fields (and Herd's
repetition_penalty and min_tokens as extra fields) over HTTP, the herd.v1 fields over gRPC."""

from __future__ import annotations

import grpc
import pytest

from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from tests.unit.platform.gateway.asgi import post as _post
from tests.unit.platform.gateway.test_grpc_server import _with_server

TOKEN = 77


def test_http_logit_bias_of_100_makes_every_token_that_token(gateway, core):
    reply = _post(gateway, "/v1/completions", {"model": "scout", "prompt": "the herd", "max_tokens": 8,
                                               "temperature": 1.0, "seed": 3, "ignore_eos": True,
                                               "logit_bias": {str(TOKEN): 100}})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["text"] == core.tokenizer.decode([TOKEN] * 8, skip_special_tokens=True)
    assert body["usage"]["completion_tokens"] == 8


def test_http_penalties_and_extensions_reach_the_engine(gateway):
    plain = {"model": "scout", "prompt": "the herd", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    base = _post(gateway, "/v1/completions", plain).json()["choices"][0]["text"]
    for extra in ({"frequency_penalty": 2.0, "presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        reply = _post(gateway, "/v1/completions", {**plain, **extra})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] != base, f"{extra} changed nothing: not passed through?"
    held = _post(gateway, "/v1/completions", {**plain, "min_tokens": 4, "max_tokens": 4})
    assert held.status_code == 200 and held.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(("extra", "param"), [
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"bad_words": [""]}, "bad_words"), ({"bad_words": ["w"] * 65}, "bad_words"),
])
def test_http_bad_penalties_are_400_naming_the_field(gateway, extra, param):
    reply = _post(gateway, "/v1/completions", {"model": "scout", "prompt": "x", "max_tokens": 4, **extra})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] in (param, f"body.{param}") or param in reply.text


def test_http_logit_bias_outside_the_vocabulary_is_400(gateway, core):
    vocab = core.engine.engine.model.config.vocab_size
    reply = _post(gateway, "/v1/completions", {"model": "scout", "prompt": "x", "max_tokens": 4,
                                               "logit_bias": {str(vocab + 5): 1}})
    assert reply.status_code == 400, reply.text
    assert "outside the vocabulary" in reply.text


def test_grpc_logit_bias_and_min_tokens(gateway, core):
    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        options = pb.SamplingOptions(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, logit_bias={TOKEN: 100.0},
                                     min_tokens=6)
        chunks = [c async for c in stub.Generate(pb.GenerateRequest(model="scout", text="the herd", sampling=options))]
        bad = pb.SamplingOptions(max_tokens=4, presence_penalty=3.0)
        try:
            async for _ in stub.Generate(pb.GenerateRequest(model="scout", text="x", sampling=bad)):
                pass
        except grpc.aio.AioRpcError as err:
            return chunks, err
        return chunks, None

    chunks, refused = _with_server(gateway, body)
    assert [t for c in chunks for t in c.token_ids] == [TOKEN] * 6
    assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "presence_penalty" in refused.details()


def test_bad_words_pass_through_both_doors(gateway, core):
    plain = {"model": "scout", "prompt": "the herd", "max_tokens": 10, "temperature": 0, "ignore_eos": True,
             "logprobs": 0}
    tokens = _post(gateway, "/v1/completions", plain).json()["choices"][0]["logprobs"]["tokens"]
    word = next(t.strip() for t in tokens if t.strip() and core.tokenizer.encode(t.strip(), literal=True)
                and len(core.tokenizer.encode(" " + t.strip(), literal=True)) == 1)
    banned = _post(gateway, "/v1/completions", {**plain, "bad_words": [word]}).json()["choices"][0]
    assert word not in [t.strip() for t in banned["logprobs"]["tokens"]]

    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        options = pb.SamplingOptions(temperature=0, max_tokens=10, ignore_eos=True, bad_words=[word])
        request = pb.GenerateRequest(model="scout", text="the herd", sampling=options)
        return [t for c in [c async for c in stub.Generate(request)] for t in c.token_ids]

    ids = _with_server(gateway, body)
    assert core.tokenizer.encode(" " + word, literal=True)[0] not in ids
