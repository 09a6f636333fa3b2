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
        ("/v1/chat/completions", {**CHAT, "n": 17}, 400, "n"),
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


# --- issue 17: nothing read for an unknown client, slow bodies, clients that stop reading --------------------
class RecordingGuard:
    """A stand-in for tenancy: one good key, and every settlement recorded."""

    KEY = "hk_goodgood_" + "k" * 32

    def __init__(self):
        self.settled: list[dict] = []

    async def authenticate(self, credential):
        from herd.platform.gateway.errors import unauthenticated

        if credential != self.KEY:
            raise unauthenticated()
        return "tenant"

    def authorize(self, identity, model):
        pass

    def adapters(self, identity):
        return {}

    def allowed_models(self, identity, models):
        return models

    def context(self, identity):
        from herd.protos.herd.v1 import inference_pb2 as pb

        return pb.TenantContext(tenant_id="t", weight=1.0)

    async def enter(self, identity, model, request_id, *, choices=1, adapter=None):
        return request_id

    async def reserve(self, admission, prompt_tokens, max_tokens, *, max_tokens_given=True):
        pass

    async def settle(self, admission, *, completion_tokens, cached_tokens, status):
        self.settled.append({"request_id": admission, "completion_tokens": completion_tokens, "status": status})


def _asgi(app, scope_path: str, headers, receive):
    """One POST through the ASGI app with `receive`: (status, JSON body)."""
    import json as _json

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": scope_path, "raw_path": scope_path.encode(),
             "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("herd", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], _json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_a_bad_key_is_401_before_a_byte_of_a_10_mb_body_is_read(core):
    from herd.platform.gateway.backend import LocalBackend
    from herd.platform.gateway.core import Gateway

    gateway = Gateway({"scout": LocalBackend(core)}, guard=RecordingGuard())
    body = b"{" * (10 * 2**20)  # malformed JSON, under the 16 MB limit: parsing it first would be a 400
    reads = 0

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"authorization", b"Bearer hk_wrongkey_" + b"x" * 32)]
    status, answer = _asgi(create_app(gateway), "/v1/chat/completions", headers, receive)
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert reads == 0, "the body was read before the key was checked"
    status, _ = _asgi(create_app(gateway), "/v1/chat/completions", headers[:2], receive)
    assert status == 401 and reads == 0, "no key at all is refused the same way"


def test_a_good_key_reaches_the_model_and_authenticates_once(core):
    from herd.platform.gateway.backend import LocalBackend
    from herd.platform.gateway.core import Gateway

    guard = RecordingGuard()
    calls = 0
    authenticate = guard.authenticate

    async def counted(credential):
        nonlocal calls
        calls += 1
        return await authenticate(credential)

    guard.authenticate = counted
    gateway = Gateway({"scout": LocalBackend(core)}, guard=guard)

    async def main():
        async with _client(gateway) as client:
            return await client.post("/v1/chat/completions", json=CHAT,
                                     headers={"authorization": f"Bearer {RecordingGuard.KEY}"})

    reply = _run(main())
    assert reply.status_code == 200 and calls == 1
    assert guard.settled and guard.settled[0]["status"] == "ok"


def test_a_body_that_does_not_arrive_in_time_is_408(gateway):
    app = create_app(gateway, read_timeout_s=0.2)
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b'{"model": "scout", ', "more_body": True}
        await asyncio.Event().wait()  # the rest never comes

    status, answer = _asgi(app, "/v1/completions", [(b"content-type", b"application/json")], receive)
    assert status == 408, answer
    assert "did not arrive within 0.2 s" in answer["error"]["message"]


def test_a_stream_whose_client_stops_reading_is_aborted_and_settled(core):
    """A real uvicorn (as herd serve builds it) and a raw socket that sends a request and never reads."""
    import socket

    import uvicorn

    from herd.platform.gateway.backend import LocalBackend
    from herd.platform.gateway.core import Gateway
    from herd.platform.server import http_config
    from herd.platform.settings import DoorLimits, HerdSettings

    guard = RecordingGuard()
    gateway = Gateway({"scout": LocalBackend(core)}, guard=guard)
    settings = HerdSettings(http_port=0, limits=DoorLimits(stream_write_timeout_s=0.5))
    app = create_app(gateway, stream_write_timeout_s=settings.limits.stream_write_timeout_s)
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 480, "ignore_eos": True, "logprobs": True,
                       "top_logprobs": 20}).encode()  # ~1 MB of events: far past what the socket buffers hold

    async def main():
        server = uvicorn.Server(http_config(app, settings))
        task = asyncio.create_task(server.serve())
        try:
            assert await until(lambda: server.started or task.done(), timeout_s=30)
            port = server.servers[0].sockets[0].getsockname()[1]
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            # A small segment size: the server's send buffer, which Linux sizes from it, stays small too.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            await asyncio.get_running_loop().sock_sendall(sock, (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: herd\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {RecordingGuard.KEY}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
            started = await until(lambda: gateway.in_flight == 1, timeout_s=30)
            ended = await until(lambda: gateway.in_flight == 0 and guard.settled, timeout_s=120)
            # The socket goes too (the kernel's TCP_USER_TIMEOUT), though the client still holds it open.
            dropped = await until(lambda: not server.server_state.connections, timeout_s=120)
            sock.close()
            return started, ended, dropped
        finally:
            server.should_exit = True
            await task

    started, ended, dropped = _run(main())
    assert started, "the request never began"
    assert ended, "the stream of a client that reads nothing was never ended"
    assert dropped, "the connection of the aborted stream was kept"
    [settled] = guard.settled
    assert settled["status"] == "cancelled" and 0 < settled["completion_tokens"] < 480, settled
