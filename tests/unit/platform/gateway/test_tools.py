"""Tool calling through the HTTP door: offered tools reach the prompt, the model's call comes back as
OpenAI tool_calls (whole and streamed), and output that is not a valid call stays plain content."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from herd.protos.herd.v1 import inference_pb2 as pb

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function",
           "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}}


class ScriptedBackend:
    """Answers every request with a fixed text, in a few chunks, and remembers the prompts it got."""

    def __init__(self, tokenizer, text):
        self.name, self.tokenizer, self.text, self.prompts = "scout", tokenizer, text, []
        self.image_prompts = None  # text only

    def card(self):
        return pb.ModelCard(id="scout", root="", max_model_len=4096, created=1)

    async def generate(self, request):
        self.prompts.append(self.tokenizer.decode(list(request.token_ids.ids), skip_special_tokens=False))
        pieces = [self.text[i : i + 5] for i in range(0, len(self.text), 5)]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            yield pb.GenerateChunk(request_id=request.request_id, text=piece, token_ids=[1],
                                   finish_reason="stop" if last else "",
                                   usage=pb.Usage(prompt_tokens=3, completion_tokens=len(pieces)) if last else None)

    async def stats(self):
        return {}

    async def healthy(self):
        return True

    async def ready_replicas(self):
        return 1


def _post(backend, body):
    async def main():
        app = create_app(Gateway({"scout": backend}))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://herd") as client:
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.run(main())


def _chat(**extra):
    return {"model": "scout", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
            **extra}


@pytest.fixture
def tokenizer(core):
    return core.tokenizer


def test_a_pythonic_call_becomes_tool_calls(tokenizer):
    backend = ScriptedBackend(tokenizer, '[get_weather(city="Paris")]')
    reply = _post(backend, _chat()).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert "get_weather" in backend.prompts[0], "the offered tool is described in the prompt"


def test_a_streamed_call_arrives_as_one_tool_calls_delta(tokenizer):
    backend = ScriptedBackend(tokenizer, '{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    body = _post(backend, _chat(stream=True)).text
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0][0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("text", ["[get_weather(city=open('x'))]", "[unknown_tool(a=1)]", "Sunny, 21 degrees [maybe]"])
def test_output_that_is_not_a_valid_call_is_plain_content(tokenizer, text):
    reply = _post(ScriptedBackend(tokenizer, text), _chat())
    assert reply.status_code == 200
    choice = reply.json()["choices"][0]
    assert choice["message"]["content"] == text and choice["message"]["tool_calls"] is None
    assert choice["finish_reason"] == "stop"


def test_tool_results_and_earlier_calls_are_accepted_back(tokenizer):
    backend = ScriptedBackend(tokenizer, "It is sunny in Paris.")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    reply = _post(backend, {"model": "scout", "messages": messages, "tools": [WEATHER]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "It is sunny in Paris."
    prompt = backend.prompts[0]
    assert "sunny, 21C" in prompt and "<|header_start|>ipython<|header_end|>" in prompt


def test_tool_choice_none_turns_parsing_off_and_bad_tools_are_400(tokenizer):
    reply = _post(ScriptedBackend(tokenizer, '[get_weather(city="Paris")]'), _chat(tool_choice="none")).json()
    assert reply["choices"][0]["message"]["content"] == '[get_weather(city="Paris")]'
    bad = _post(ScriptedBackend(tokenizer, "x"), _chat(tool_choice={"type": "function", "function": {"name": "nope"}}))
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
