"""Tools and text.format on the Responses door: a forced tool choice on the real tiny model gives function_call
items whose arguments validate, text.format json_schema gives JSON that validates, a scripted model's call comes
back as function_call items (whole and streamed with their argument events), and a tool's result sent back as
items is rendered the way the chat door renders it."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from herd.engine import EngineConfig
from herd.engine.errors import Code, HerdError
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore
from tests.unit.platform.gateway.test_tools import ScriptedBackend

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"enum": [1, 2, 3]}},
        "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": CITY}
TIME = {"type": "function", "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}, "sure": {"type": "boolean"}},
          "required": ["answer", "sure"], "additionalProperties": False}


@pytest.fixture(scope="module")
def roomy(tiny_path):
    """A replica with room for tool definitions in the prompt (the tiny tokenizer spends many tokens on them)."""
    config = ReplicaConfig(name="scout", path=str(tiny_path), shards=2, transport="local",
                           engine=EngineConfig(kv_cache_mb=48, max_num_seqs=8, max_model_len=2048))
    return ReplicaCore(config)


def _with_client(backend, body):
    async def main():
        app = create_app(Gateway({"scout": backend}))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd/v1")
        async with openai.AsyncOpenAI(api_key="unused", base_url="http://herd/v1", http_client=http) as client:
            return await body(client)

    return asyncio.run(main())


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_forced_tool_choice_gives_function_calls_whose_arguments_validate(roomy, choice):
    async def body(client):
        return await asyncio.gather(*(
            client.responses.create(model="scout", input="Weather in Oslo?", tools=[WEATHER, TIME],
                                    tool_choice=choice, parallel_tool_calls=False, temperature=1.0,
                                    max_output_tokens=256) for _ in range(8)))

    responses = _with_client(LocalBackend(roomy, max_ongoing_requests=8, max_queued_requests=8), body)
    for response in responses:
        assert response.status == "completed", response
        calls = [item for item in response.output if item.type == "function_call"]
        assert len(calls) == 1, response.output
        [call] = calls
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        if isinstance(choice, dict):
            assert call.name == "get_weather"
        schema = CITY if call.name == "get_weather" else TIME["parameters"]
        jsonschema.validate(json.loads(call.arguments), schema)


def test_text_format_json_schema_gives_json_that_validates(roomy):
    fmt = {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}

    async def body(client):
        whole = await client.responses.create(model="scout", input="Answer in JSON.", text={"format": fmt},
                                              temperature=1.0, max_output_tokens=200)
        stream = await client.responses.create(model="scout", input="Answer in JSON.", text={"format": fmt},
                                               temperature=1.0, max_output_tokens=200, stream=True)
        events = [e async for e in stream]
        try:
            await client.responses.create(model="scout", input="x", text={"format": fmt}, tools=[WEATHER],
                                          tool_choice="required")
        except openai.BadRequestError as err:
            return whole, events, err.body

    whole, events, refused = _with_client(LocalBackend(roomy), body)
    assert whole.status == "completed" and whole.text.format.type == "json_schema"
    jsonschema.validate(json.loads(whole.output_text), ANSWER)
    jsonschema.validate(json.loads(events[-1].response.output_text), ANSWER)
    assert refused["param"] == "tool_choice", "a json format beside a forced tool choice is refused"


def test_a_scripted_call_is_function_call_items_whole_and_streamed(core):
    backend = ScriptedBackend(core.tokenizer, 'Let me look.[get_weather(city="Paris", days=2)]')

    async def body(client):
        whole = await client.responses.create(model="scout", input="Weather in Paris?", tools=[WEATHER])
        stream = await client.responses.create(model="scout", input="Weather in Paris?", tools=[WEATHER],
                                               stream=True)
        return whole, [e async for e in stream]

    whole, events = _with_client(backend, body)
    message, call = whole.output
    assert message.type == "message" and message.content[0].text == "Let me look."
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "days": 2}
    assert "get_weather" in backend.prompts[0], "the offered tool is described in the prompt"
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added, delta, done, item_done = events[8:12]
    assert added.output_index == delta.output_index == 1 and added.item.arguments == ""
    assert json.loads(done.arguments) == {"city": "Paris", "days": 2} and delta.delta == done.arguments
    assert item_done.item.call_id == events[-1].response.output[1].call_id


def test_a_tools_result_sent_back_as_items_is_rendered_like_the_chat_doors(core):
    backend = ScriptedBackend(core.tokenizer, "It is sunny.")
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    result = {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "sunny"}'}

    async def body(client):
        await client.chat.completions.create(model="scout", tools=[{"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city", "parameters": CITY}}], messages=[
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}])
        return await client.responses.create(model="scout", instructions="Use tools.", tools=[WEATHER], input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}, call, result])

    response = _with_client(backend, body)
    assert backend.prompts[1] == backend.prompts[0]
    assert response.output_text == "It is sunny."


def test_a_call_continued_by_previous_response_id_and_its_result(core):
    """The agent loop: a response calls a function; the next request names it and sends only the result."""
    backend = ScriptedBackend(core.tokenizer, '[get_weather(city="Paris", days=2)]')

    async def body(client):
        first = await client.responses.create(model="scout", input="Weather in Paris?", tools=[WEATHER])
        [call] = first.output
        result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}
        second = await client.responses.create(model="scout", input=[result], tools=[WEATHER],
                                               previous_response_id=first.id)
        return call, second

    call, second = _with_client(backend, body)
    assert call.type == "function_call" and second.previous_response_id is not None
    prompt = backend.prompts[1]
    asked, called, answered = (prompt.index(s) for s in ("Weather in Paris?", 'get_weather(city="Paris", days=2)',
                                                         '{"sky": "sunny"}'))
    assert asked < called < answered
    assert "<|header_start|>ipython<|header_end|>" in prompt[called:answered], "the result is a tool message"


class FailingMidway(ScriptedBackend):
    """Sends one chunk, then fails as a replica that went away does."""

    async def generate(self, request):
        yield pb.GenerateChunk(request_id=request.request_id, text="Hal", token_ids=[1])
        raise HerdError(Code.UNAVAILABLE, "gone")


def test_a_refused_constraint_is_400_streamed_or_not_and_a_failure_midway_is_an_error_event(core):
    bad = {"format": {"type": "json_schema", "name": "bad", "schema": {"type": "nonsense"}}}

    async def main():
        apps = {"ok": create_app(Gateway({"scout": LocalBackend(core)})),
                "failing": create_app(Gateway({"scout": FailingMidway(core.tokenizer, "")}))}
        out = []
        for name, stream in (("ok", False), ("ok", True), ("failing", True)):
            transport = httpx.ASGITransport(app=apps[name])
            async with httpx.AsyncClient(transport=transport, base_url="http://herd") as client:
                body = {"model": "scout", "input": "x", "stream": stream, "max_output_tokens": 4}
                out.append(await client.post("/v1/responses", json=body | ({"text": bad} if name == "ok" else {})))
        return out

    whole, streamed, failing = asyncio.run(main())
    for refused in (whole, streamed):
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "text.format", refused.text
    assert failing.status_code == 200
    events = [json.loads(line[len("data: "):]) for line in failing.text.splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["response.output_text.delta", "error"] and kinds[0] == "response.created"
    assert events[-1]["sequence_number"] == len(events) - 1 and events[-1]["message"] == "gone"
    assert "event: error\n" in failing.text
