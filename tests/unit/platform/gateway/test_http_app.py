"""The OpenAI-compatible HTTP door over an in-process replica: answers, streams, errors, backpressure."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from herd.engine import SamplingParams
from herd.model.chat_template import render_chat
from herd.platform.gateway.http_app import create_app
from tests.waiting import until

CHAT = {"model": "scout", "messages": [{"role": "user", "content": "Tell me about the herd."}],
        "max_tokens": 12, "temperature": 0}


def _client(gateway):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://herd")


def _run(coro):
    return asyncio.run(coro)


def _events(body: str):
    lines = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_models_and_a_greedy_chat_equal_to_the_engine(gateway, core):
    async def main():
        async with _client(gateway) as client:
            models = (await client.get("/v1/models")).json()
            reply = (await client.post("/v1/chat/completions", json=CHAT)).json()
            return models, reply

    models, reply = _run(main())
    assert [m["id"] for m in models["data"]] == ["scout"] and models["data"][0]["max_model_len"] == 512
    prompt = core.tokenizer.encode(render_chat(CHAT["messages"]))
    expected = core.engine.engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    choice = reply["choices"][0]
    assert choice["message"]["content"] == expected.text
    assert choice["finish_reason"] == expected.finish_reason
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    assert reply["usage"]["completion_tokens"] == len(expected.token_ids)
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")


def test_streamed_chat_adds_up_and_reports_usage(gateway):
    async def main():
        async with _client(gateway) as client:
            whole = (await client.post("/v1/chat/completions", json=CHAT)).json()
            streamed = await client.post("/v1/chat/completions", json={
                **CHAT, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2})
            return whole, streamed

    whole, streamed = _run(main())
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == [whole["choices"][0]["finish_reason"]]
    tokens = whole["usage"]["completion_tokens"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == tokens
    logprobs = [t for e in events if e["choices"] and e["choices"][0]["logprobs"]
                for t in e["choices"][0]["logprobs"]["content"]]
    assert len(logprobs) == tokens and all(len(t["top_logprobs"]) == 2 for t in logprobs)


def test_completions_with_text_and_token_prompts(gateway):
    async def main():
        async with _client(gateway) as client:
            by_text = await client.post("/v1/completions", json={"model": "scout", "prompt": "the herd",
                                                                  "max_tokens": 5, "temperature": 0, "logprobs": 1})
            by_ids = await client.post("/v1/completions", json={"model": "scout", "prompt": [1, 2, 3],
                                                                 "max_tokens": 5, "temperature": 0})
            return by_text.json(), by_ids.json()

    by_text, by_ids = _run(main())
    assert by_text["object"] == "text_completion" and by_text["usage"]["completion_tokens"] == 5
    assert len(by_text["choices"][0]["logprobs"]["tokens"]) == 5
    assert by_ids["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404, "does not exist"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 100000}, 400, "maximum context length is 512"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 600}]}, 400,
         "maximum context length"),
        ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n"),
        ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {**CHAT, "stop": 7}, 400, "stop"),
        ("/v1/chat/completions", {**CHAT, "surprise": True}, 400, "surprise"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "image"),
        ("/v1/completions", {"model": "scout", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "scout", "prompt": [1, 99999]}, 400, "vocabulary"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(gateway, path, body, status, needle):
    async def main():
        async with _client(gateway) as client:
            kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            bad = await client.post(path, **kwargs)
            good = await client.post("/v1/chat/completions", json=CHAT)
            return bad, good

    bad, good = _run(main())
    assert bad.status_code == status, bad.text
    error = bad.json()["error"]
    assert needle in error["message"] or needle == error.get("param"), error
    assert set(error) == {"message", "type", "param", "code"}
    assert good.status_code == 200


def test_beyond_capacity_requests_are_refused_at_once_with_retry_after(gateway, core):
    long = {**CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def main():
        async with _client(gateway) as client:
            running = [asyncio.create_task(client.post("/v1/chat/completions", json=long)) for _ in range(6)]
            assert await until(lambda: core.stats()["in_flight"] == 6), "the six requests never all got in"
            refused = await client.post("/v1/chat/completions", json=CHAT)
            done = await asyncio.gather(*running)
            return refused, done

    refused, done = _run(main())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert all(r.status_code == 200 for r in done)
    assert core.stats()["in_flight"] == 0


def test_the_openapi_document_describes_what_the_server_accepts(gateway):
    async def main():
        async with _client(gateway) as client:
            doc = (await client.get("/openapi.json")).json()
            extra = await client.post("/v1/chat/completions", json={**CHAT, "not_in_the_schema": 1})
            return doc, extra

    doc, extra = _run(main())
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(doc["paths"])
    schema = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert schema.get("additionalProperties") is False, "unknown fields are refused, and the document says so"
    for name in ("model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                 "n", "logprobs", "top_logprobs", "stream", "stream_options", "tools", "tool_choice"):
        assert name in schema["properties"], name
    assert extra.status_code == 400 and "not_in_the_schema" in extra.json()["error"]["message"]
