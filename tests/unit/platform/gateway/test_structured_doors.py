"""Structured outputs and forced tool calls through both doors to a real replica (the random tiny model): the
official openai client over HTTP (response_format, the structured_outputs extension, tool_choice), and gRPC's
herd.v1.StructuredOutput. 50 requests per schema; bad constraints refused by the request's own field."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import httpx
import jsonschema
import openai
import pytest

from herd.engine import EngineConfig
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore
from tests.structured_schemas import GRAMMAR, REGEXES, SCHEMAS, in_grammar
from tests.unit.platform.gateway.test_grpc_server import _with_server

N = 50


@pytest.fixture(scope="module")
def roomy(tiny_path):
    """A replica with room for tool definitions in the prompt (the tiny tokenizer spends many tokens on them)."""
    config = ReplicaConfig(name="scout", path=str(tiny_path), shards=2, transport="local",
                           engine=EngineConfig(kv_cache_mb=48, max_num_seqs=32, max_model_len=2048))
    return ReplicaCore(config)


@pytest.fixture
def wide(roomy):
    """A gateway that takes 50 requests at once."""
    return Gateway({"scout": LocalBackend(roomy, max_ongoing_requests=N, max_queued_requests=N)})


def _with_client(gateway, body):
    async def main():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://herd/v1")
        async with openai.AsyncOpenAI(api_key="unused", base_url="http://herd/v1", http_client=http) as client:
            return await body(client)

    return asyncio.run(main())


def _chat(client, seed, **kwargs):
    kwargs = {"temperature": 1.0, "max_tokens": 256, **kwargs}
    return client.chat.completions.create(model="scout", messages=[{"role": "user", "content": "answer"}],
                                          seed=seed, **kwargs)


@pytest.mark.parametrize("name", ["nested", "any_of", "array_of_objects"])
def test_openai_client_json_schema_fifty_requests_validate(wide, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}

    async def body(client):
        return await asyncio.gather(*[_chat(client, seed, response_format=fmt) for seed in range(N)])

    for reply in _with_client(wide, body):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_openai_client_json_object_regex_grammar_and_choice(wide):
    async def body(client):
        obj = _chat(client, 1, max_tokens=400, response_format={"type": "json_object"})
        regexes = [_chat(client, s, extra_body={"structured_outputs": {"regex": REGEXES[0]}}) for s in range(10)]
        grammars = [client.completions.create(model="scout", prompt="sum", temperature=1.0, seed=s, max_tokens=128,
                                              extra_body={"structured_outputs": {"grammar": GRAMMAR}})
                    for s in range(10)]
        choice = _chat(client, 2, extra_body={"structured_outputs": {"choice": ["north", "south"]}})
        return await asyncio.gather(obj, choice, *regexes, *grammars)

    obj, choice, *rest = _with_client(wide, body)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    assert obj.choices[0].message.content.startswith("{")
    assert choice.choices[0].message.content in ("north", "south")
    for reply in rest[:10]:
        assert re.fullmatch(REGEXES[0], reply.choices[0].message.content, re.ASCII)
    for reply in rest[10:]:
        assert in_grammar(reply.choices[0].text), reply.choices[0].text


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Lima"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["tz"],
        "additionalProperties": False}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.mark.parametrize(("tool_choice", "parallel", "names"), [
    ("required", None, {"get_weather", "get_time"}), ("required", False, {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, None, {"get_time"}),
])
def test_forced_tool_calls_parse_and_validate(wide, tool_choice, parallel, names):
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}

    async def body(client):
        return await asyncio.gather(*[_chat(client, seed, tools=TOOLS, tool_choice=tool_choice, max_tokens=1000,
                                            **extra) for seed in range(20)])

    called = set()
    for reply in _with_client(wide, body):
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        calls = choice.message.tool_calls
        assert calls and (parallel is not False or len(calls) == 1)
        for call in calls:
            assert call.function.name in names
            jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
            called.add(call.function.name)
    assert called == names, "every allowed function is called by some sample"


def test_forced_tool_calls_stream_as_tool_call_deltas(wide):
    async def body(client):
        stream = await _chat(client, 3, tools=TOOLS, tool_choice="required", stream=True)
        return [chunk async for chunk in stream]

    chunks = _with_client(wide, body)
    calls = [c for chunk in chunks for choice in chunk.choices for c in choice.delta.tool_calls or []]
    assert calls and chunks[-1].choices[0].finish_reason == "tool_calls"
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "no-such-format"}}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"extra_body": {"structured_outputs": {"regex": "[a-z"}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: nowhere"}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_bad_constraints_are_400_naming_the_field(wide, kwargs, param):
    async def body(client):
        try:
            await _chat(client, 0, **kwargs)
        except openai.BadRequestError as err:
            return err
        return None

    refused = _with_client(wide, body)
    assert refused is not None, "accepted"
    error = refused.body if isinstance(refused.body, dict) else {}
    assert param in (error.get("param") or "") or param in str(refused), refused


def test_the_server_keeps_serving_after_a_refused_constraint(wide):
    async def body(client):
        with pytest.raises(openai.BadRequestError):
            await _chat(client, 0, extra_body={"structured_outputs": {"regex": "(unclosed"}})
        return await _chat(client, 0, max_tokens=4)

    assert _with_client(wide, body).choices[0].message.content is not None


@pytest.mark.parametrize("name", ["numbers", "optional_and_pattern"])
def test_grpc_json_schema_fifty_requests_validate(wide, name):
    schema = SCHEMAS[name]
    structured = pb.StructuredOutput(json_schema=json.dumps(schema))

    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)

        async def one(seed):
            options = pb.SamplingOptions(temperature=1.0, seed=seed, max_tokens=256, structured=structured)
            chunks = [c async for c in stub.Generate(pb.GenerateRequest(model="scout", text="x", sampling=options))]
            return "".join(c.text for c in chunks), chunks[-1].finish_reason

        return await asyncio.gather(*[one(seed) for seed in range(N)])

    for text, finish in _with_server(wide, body):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_grpc_regex_grammar_choice_and_refusals(wide):
    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)

        async def text(structured, seed=0):
            options = pb.SamplingOptions(temperature=1.0, seed=seed, max_tokens=128, structured=structured)
            request = pb.GenerateRequest(model="scout", text="x", sampling=options)
            return "".join([c.text async for c in stub.Generate(request)])

        async def refusal(structured):
            try:
                await text(structured)
            except grpc.aio.AioRpcError as err:
                return err
            return None

        got = await asyncio.gather(*[text(pb.StructuredOutput(regex=REGEXES[1]), s) for s in range(10)],
                                   *[text(pb.StructuredOutput(grammar=GRAMMAR), s) for s in range(10)],
                                   text(pb.StructuredOutput(choice=pb.Choices(choices=["up", "down"]))))
        bad = [await refusal(s) for s in (pb.StructuredOutput(regex="[a-z"), pb.StructuredOutput(),
                                          pb.StructuredOutput(json_schema="{nope"),
                                          pb.StructuredOutput(json_schema='{"type": "strin"}'))]
        return got, bad

    got, bad = _with_server(wide, body)
    assert all(re.fullmatch(REGEXES[1], t, re.ASCII) for t in got[:10]), got[:10]
    assert all(in_grammar(t) for t in got[10:20]), got[10:20]
    assert got[20] in ("up", "down")
    for err in bad:
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "structured" in err.details()


def _grpc_tools():
    return [pb.FunctionTool(name=t["function"]["name"], description=t["function"].get("description", ""),
                            parameters_json=json.dumps(t["function"]["parameters"])) for t in TOOLS]


@pytest.mark.parametrize(("tool_choice", "names"), [("required", {"get_weather", "get_time"}),
                                                    ("get_weather", {"get_weather"})])
def test_grpc_chat_forced_tool_calls_parse_and_validate(wide, tool_choice, names):
    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)

        async def one(seed):
            request = pb.ChatRequest(model="scout", messages=[pb.ChatMessage(role="user", content="call")],
                                     sampling=pb.SamplingOptions(temperature=1.0, seed=seed, max_tokens=1000),
                                     tools=_grpc_tools(), tool_choice=tool_choice, parallel_tool_calls=False)
            return [c async for c in stub.Chat(request)]

        return await asyncio.gather(*[one(seed) for seed in range(10)])

    for chunks in _with_server(wide, body):
        last = chunks[-1]
        assert last.finish_reason == "tool_calls" and len(last.tool_calls) == 1, "".join(c.text for c in chunks)
        call = last.tool_calls[0]
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments_json), SCHEMA_OF[call.name])


def test_grpc_chat_tool_refusals_name_the_field(wide):
    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        refusals = []
        for tools, choice in ((_grpc_tools(), "nope"), ([pb.FunctionTool(name="f", parameters_json="{bad")], "auto"),
                              ([], "required")):
            request = pb.ChatRequest(model="scout", messages=[pb.ChatMessage(role="user", content="call")],
                                     sampling=pb.SamplingOptions(max_tokens=4), tools=tools, tool_choice=choice)
            try:
                _ = [c async for c in stub.Chat(request)]
                refusals.append(None)
            except grpc.aio.AioRpcError as err:
                refusals.append(err)
        return refusals

    nope, bad_json, no_tools = _with_server(wide, body)
    for err, field in ((nope, "nope"), (bad_json, "parameters_json"), (no_tools, "tool_choice")):
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.details()
