"""The Anthropic Messages door over an in-process replica, with the official anthropic client: plain, streamed,
system, stop_sequences, images, tools and tool results, and Anthropic-shaped errors."""

from __future__ import annotations

import asyncio
import base64
import json

import anthropic
import httpx
import httpx2
import jsonschema
import pytest

from herd.engine import EngineConfig
from herd.engine.errors import Code, HerdError
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore
from tests.images import random_png

HELLO = [{"role": "user", "content": "Tell me about the herd."}]
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                        "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city"], "additionalProperties": False}
T0 = {"temperature": 0}  # the client no longer has a temperature argument; the door still takes it
TZ = {"type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["tz"],
      "additionalProperties": False}
WEATHER = {"name": "get_weather", "description": "Weather in a city", "input_schema": CITY}


def _anthropic(app, api_key: str = "unused") -> anthropic.AsyncAnthropic:
    """The official client in process (it speaks through httpx2, httpx's successor, which has an ASGI transport)."""
    return anthropic.AsyncAnthropic(api_key=api_key, base_url="http://herd", max_retries=0,
                                    http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)))


def _run(gateway, use, **app_kwargs):
    """`use(client, http)` against a fresh app over `gateway`: the anthropic client and a raw httpx client."""
    app = create_app(gateway, **app_kwargs)

    async def main():
        async with _anthropic(app) as client, httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                                base_url="http://herd") as http:
            return await use(client, http)

    return asyncio.run(main())


def _text(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_a_plain_message_is_the_chat_the_openai_door_answers(gateway):
    async def use(client, http):
        message = await client.messages.create(model="scout", max_tokens=8, messages=HELLO, extra_body=T0)
        chat = await http.post("/v1/chat/completions", json={"model": "scout", "messages": HELLO, "max_tokens": 8,
                                                              "temperature": 0})
        return message, chat.json()

    message, chat = _run(gateway, use)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "scout"
    assert [b.type for b in message.content] == ["text"]
    assert _text(message) == chat["choices"][0]["message"]["content"]
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat["choices"][0]["finish_reason"]]
    assert message.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert message.usage.output_tokens == chat["usage"]["completion_tokens"]
    assert message.usage.cache_read_input_tokens is not None


def test_a_streamed_message_has_anthropics_event_order_and_the_same_text(gateway):
    async def use(client, http):
        whole = await client.messages.create(model="scout", max_tokens=10, messages=HELLO, extra_body=T0)
        stream = await client.messages.create(model="scout", max_tokens=10, messages=HELLO, extra_body=T0,
                                              stream=True)
        events = [event async for event in stream]
        async with client.messages.stream(model="scout", max_tokens=10, messages=HELLO, extra_body=T0) as helper:
            final = await helper.get_final_message()
        raw = await http.post("/v1/messages", json={"model": "scout", "max_tokens": 3, "messages": HELLO,
                                                     "stream": True}, headers={"anthropic-version": "2023-06-01"})
        return whole, events, final, raw

    whole, events, final, raw = _run(gateway, use)
    kinds = [e.type for e in events]  # the client drops pings
    deltas = kinds.count("content_block_delta")
    assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    assert deltas >= 1
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == _text(whole)
    assert events[-2].delta.stop_reason == whole.stop_reason
    assert events[-2].usage.output_tokens == whole.usage.output_tokens
    assert _text(final) == _text(whole) and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert raw.headers["content-type"].startswith("text/event-stream")
    lines = raw.text.split("\n")
    assert lines[1].startswith('data: {"type":"message_start"')
    named = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    raw_deltas = named.count("content_block_delta")
    assert named == ["message_start", "content_block_start", "ping", *["content_block_delta"] * raw_deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    assert "[DONE]" not in raw.text


def test_the_system_prompt_changes_the_answer_as_it_does_on_the_openai_door(gateway):
    system = "You are a terse herder who speaks of goats."

    async def use(client, http):
        as_string = await client.messages.create(model="scout", max_tokens=8, messages=HELLO, extra_body=T0,
                                                 system=system)
        as_blocks = await client.messages.create(model="scout", max_tokens=8, messages=HELLO, extra_body=T0,
                                                 system=[{"type": "text", "text": system,
                                                          "cache_control": {"type": "ephemeral"}}])
        chat = await http.post("/v1/chat/completions", json={
            "model": "scout", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": system}, *HELLO]})
        plain = await http.post("/v1/chat/completions", json={"model": "scout", "max_tokens": 8, "temperature": 0,
                                                               "messages": HELLO})
        return as_string, as_blocks, chat.json(), plain.json()

    as_string, as_blocks, chat, plain = _run(gateway, use)
    assert _text(as_string) == _text(as_blocks) == chat["choices"][0]["message"]["content"]
    assert as_string.usage.input_tokens == chat["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


def test_a_stop_sequence_ends_the_reply_and_is_named(gateway):
    async def use(client, http):
        free = await client.messages.create(model="scout", max_tokens=24, messages=HELLO, extra_body=T0)
        text = _text(free)
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        stopped = await client.messages.create(model="scout", max_tokens=24, messages=HELLO, extra_body=T0,
                                               stop_sequences=["\u2603 never", stop])
        streamed = await client.messages.create(model="scout", max_tokens=24, messages=HELLO, extra_body=T0,
                                                stop_sequences=[stop], stream=True)
        return text, stop, stopped, [e async for e in streamed]

    text, stop, stopped, events = _run(gateway, use)
    assert len(text) >= 4 and stop.strip(), text
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert _text(stopped) == text[: text.index(stop)]
    delta = next(e for e in events if e.type == "message_delta").delta
    assert delta.stop_reason == "stop_sequence" and delta.stop_sequence == stop


def test_an_image_block_is_seen_and_counted_and_url_sources_follow_the_policy(gateway):
    png = base64.b64encode(random_png(120, 90, seed=1)).decode()
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
    question = {"type": "text", "text": "What is in this picture?"}

    async def use(client, http):
        seen = await client.messages.create(model="scout", max_tokens=4, extra_body=T0,
                                            messages=[{"role": "user", "content": [image, question]}])
        text_only = await client.messages.create(model="scout", max_tokens=4, extra_body=T0,
                                                 messages=[{"role": "user", "content": [question]}])
        as_url = await client.messages.create(model="scout", max_tokens=4, extra_body=T0, messages=[
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "url", "url": f"data:image/png;base64,{png}"}}, question]}])
        refusals = []
        for source in ({"type": "url", "url": "http://example.com/cat.png"},
                       {"type": "base64", "media_type": "image/png", "data": "not base64!"}):
            try:
                await client.messages.create(model="scout", max_tokens=4, messages=[
                    {"role": "user", "content": [{"type": "image", "source": source}, question]}])
            except anthropic.BadRequestError as err:
                refusals.append(err)
        return seen, text_only, as_url, refusals

    seen, text_only, as_url, refusals = _run(gateway, use)
    assert seen.usage.input_tokens >= text_only.usage.input_tokens + 147  # one tile's placeholder tokens at least
    assert as_url.usage.input_tokens == seen.usage.input_tokens and _text(as_url) == _text(seen)
    assert len(refusals) == 2
    for err in refusals:
        assert err.status_code == 400 and err.body["type"] == "error"
        assert err.body["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def roomy(tiny_path):
    """A gateway with room for tool definitions in the prompt (the tiny tokenizer spends many tokens on them)."""
    config = ReplicaConfig(name="scout", path=str(tiny_path), shards=2, transport="local",
                           engine=EngineConfig(kv_cache_mb=48, max_num_seqs=8, max_model_len=2048))
    return Gateway({"scout": LocalBackend(ReplicaCore(config), max_ongoing_requests=8, max_queued_requests=8)})


def test_a_forced_tool_call_validates_and_its_result_is_the_next_turn(roomy):
    async def use(client, http):
        calls = [await client.messages.create(
            model="scout", max_tokens=400, extra_body={"temperature": 1.0},
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER], tool_choice={"type": "any"}) for _ in range(3)]
        named = await client.messages.create(
            model="scout", max_tokens=400, extra_body=T0, messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER, {"name": "get_time", "input_schema": TZ}],
            tool_choice={"type": "tool", "name": "get_time"})
        use_block = next(b for b in calls[0].content if b.type == "tool_use")
        follow_up = await client.messages.create(model="scout", max_tokens=8, extra_body=T0, tools=[WEATHER],
                                                 messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": use_block.id, "name": use_block.name,
                                               "input": use_block.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use_block.id,
                                          "content": "Sunny, 21 C"},
                                         {"type": "text", "text": "And tomorrow?"}]}])
        stream = await client.messages.create(
            model="scout", max_tokens=400, extra_body=T0, messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True}, stream=True)
        events = [e async for e in stream]
        async with client.messages.stream(
                model="scout", max_tokens=400, extra_body=T0, messages=[{"role": "user", "content": "Oslo?"}],
                tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}) as helper:
            accumulated = await helper.get_final_message()
        return calls, named, follow_up, events, accumulated

    calls, named, follow_up, events, accumulated = _run(roomy, use)
    for message in calls:
        assert message.stop_reason == "tool_use"
        uses = [b for b in message.content if b.type == "tool_use"]
        assert uses and all(b.id.startswith("toolu_") and b.name == "get_weather" for b in uses)
        for block in uses:
            jsonschema.validate(block.input, CITY)
    assert named.stop_reason == "tool_use" and {b.name for b in named.content if b.type == "tool_use"} == {"get_time"}
    assert follow_up.stop_reason in ("end_turn", "max_tokens", "stop_sequence") and follow_up.usage.input_tokens > 0
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [b.type for b in starts] == ["tool_use"], "one call at most without parallel tool use"
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    jsonschema.validate(json.loads(partial), CITY)
    assert events[-2].delta.stop_reason == "tool_use"
    assert accumulated.stop_reason == "tool_use", "the client's own accumulation reads the streamed tool_use"
    streamed_use = next(b for b in accumulated.content if b.type == "tool_use")
    assert streamed_use.name == "get_weather" and streamed_use.id.startswith("toolu_")
    jsonschema.validate(streamed_use.input, CITY)


def test_output_config_format_holds_the_reply_to_a_json_schema(gateway):
    async def use(client, http):
        replies = [await client.messages.create(model="scout", max_tokens=120, messages=HELLO,
                                                output_config={"format": {"type": "json_schema", "schema": CITY}},
                                                extra_body={"temperature": 1.0}) for _ in range(3)]
        bad = await http.post("/v1/messages", json={"model": "scout", "max_tokens": 4, "messages": HELLO,
                                                     "output_config": {"format": {"type": "json_schema",
                                                                                  "schema": {"type": "nope"}}}})
        return replies, bad

    replies, bad = _run(gateway, use)
    for reply in replies:
        assert reply.stop_reason == "end_turn"
        jsonschema.validate(json.loads(_text(reply)), CITY)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert bad.json()["error"]["message"].startswith("output_config.format"), "the refusal names the field"


class ScriptedBackend:
    """Answers every request with a fixed text (or fails after its first chunk) and remembers its prompts."""

    def __init__(self, tokenizer, text, *, fail=False):
        self.name, self.tokenizer, self.text, self.fail, self.prompts = "scout", tokenizer, text, fail, []
        self.image_prompts = None

    def card(self):
        return pb.ModelCard(id="scout", root="", max_model_len=4096, created=1)

    async def generate(self, request):
        self.prompts.append(self.tokenizer.decode(list(request.token_ids.ids), skip_special_tokens=False))
        yield pb.GenerateChunk(request_id=request.request_id, text=self.text[:5], token_ids=[1])
        if self.fail:
            raise HerdError(Code.INVALID_ARGUMENT, "the replica refused the rest")
        yield pb.GenerateChunk(request_id=request.request_id, text=self.text[5:], token_ids=[1], finish_reason="stop",
                               usage=pb.Usage(prompt_tokens=3, completion_tokens=2))

    async def stats(self):
        return {}

    async def healthy(self):
        return True

    async def ready_replicas(self):
        return 1


def test_turns_reach_the_prompt_and_prose_before_a_call_is_a_text_block(core):
    backend = ScriptedBackend(core.tokenizer, 'Let me look. [get_weather(city="Paris")]')
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                                  {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Rome"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                              "content": [{"type": "text", "text": "station offline"}]}]}]

    async def use(client, http):
        return await client.messages.create(model="scout", max_tokens=30, system="Be brief.", messages=messages,
                                            tools=[WEATHER])

    message = _run(Gateway({"scout": backend}), use)
    prompt = backend.prompts[0]
    for expected in ("Be brief.", "Weather in Paris?", "Checking.", 'get_weather(city="Rome")', "station offline",
                     "get_weather"):
        assert expected in prompt
    assert prompt.index("Weather in Paris?") < prompt.index("Checking.") < prompt.index("station offline")
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text.strip() == "Let me look."
    assert message.content[1].input == {"city": "Paris"} and message.stop_reason == "tool_use"


def test_a_failure_mid_stream_is_an_error_event(core):
    backend = ScriptedBackend(core.tokenizer, "hello there", fail=True)

    async def use(client, http):
        raw = await http.post("/v1/messages", json={"model": "scout", "max_tokens": 5, "messages": HELLO,
                                                     "stream": True})
        stream = await client.messages.create(model="scout", max_tokens=5, messages=HELLO, stream=True)
        with pytest.raises(anthropic.APIStatusError) as caught:
            async for _ in stream:
                pass
        return raw, caught.value

    raw, err = _run(Gateway({"scout": backend}), use)
    assert raw.status_code == 200
    assert raw.text.rstrip().split("\n")[-2:] == [
        "event: error", 'data: {"type":"error","error":{"type":"invalid_request_error",'
                        '"message":"the replica refused the rest"}}']
    assert "replica refused" in str(err)
