"""n and best_of through both doors to a real replica: OpenAI's choices with their indexes (whole and streamed),
usage counting every choice's tokens and the prompt once, the limits refused by name; gRPC chunks with index."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import pytest

from herd.engine import EngineConfig
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import InProcessRateLimiter
from herd.platform.tenancy.store import TenantStore
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore
from tests.unit.platform.gateway.asgi import post as _post
from tests.unit.platform.gateway.test_grpc_server import _with_server

PLAIN = {"model": "scout", "prompt": "the herd", "max_tokens": 5, "temperature": 1.0, "ignore_eos": True}
CHAT = {"model": "scout", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 1.0,
        "ignore_eos": True}


def _events(text):
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completions_n_returns_every_choice_and_usage_counts_each(gateway, core):
    reply = _post(gateway, "/v1/completions", {**PLAIN, "n": 3, "logprobs": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(len(c["logprobs"]["tokens"]) == 5 and c["finish_reason"] == "length" for c in body["choices"])
    prompt = len(core.tokenizer.encode("the herd"))
    assert body["usage"]["completion_tokens"] == 15
    assert body["usage"]["prompt_tokens"] <= prompt + 1, "the prompt is counted once"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 15


def test_chat_n_returns_every_choice(gateway):
    reply = _post(gateway, "/v1/chat/completions", {**CHAT, "n": 3, "seed": 4})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" for c in body["choices"])
    assert len({c["message"]["content"] for c in body["choices"]}) > 1, "the choices are sampled apart"
    assert body["usage"]["completion_tokens"] == 15


def test_streamed_choices_carry_their_indexes_and_usage_sums_them(gateway):
    for path, body in (("/v1/completions", PLAIN), ("/v1/chat/completions", CHAT)):
        reply = _post(gateway, path, {**body, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
        assert reply.status_code == 200, reply.text
        events = _events(reply.text)
        choices = [c for e in events for c in e["choices"]]
        assert {c["index"] for c in choices} == {0, 1}
        finished = sorted(c["index"] for c in choices if c["finish_reason"])
        assert finished == [0, 1], path
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10, path
        if path.endswith("chat/completions"):
            roles = sorted(c["index"] for c in choices if c["delta"].get("role") == "assistant")
            assert roles == [0, 1], "each choice opens with the assistant's role"


def test_best_of_returns_n_choices(gateway):
    reply = _post(gateway, "/v1/completions", {**PLAIN, "n": 2, "best_of": 3})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 10


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"n": 17}, "n"), ("/v1/chat/completions", {"n": 17}, "n"),
    ("/v1/completions", {"n": 0}, "n"), ("/v1/completions", {"n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"best_of": 2, "stream": True}, "best_of"), ("/v1/chat/completions", {"best_of": 2}, "best_of"),
])
def test_bad_n_and_best_of_are_400_naming_the_field(gateway, path, extra, param):
    body = PLAIN if path == "/v1/completions" else CHAT
    reply = _post(gateway, path, {**body, **extra})
    assert reply.status_code == 400, reply.text
    assert param in (reply.json()["error"]["param"] or "") or param in reply.json()["error"]["message"]


def test_grpc_generate_with_n_streams_chunks_of_each_index(gateway):
    async def body(channel):
        stub = pb_grpc.InferenceStub(channel)
        options = pb.SamplingOptions(temperature=1.0, max_tokens=4, ignore_eos=True, n=2)
        chunks = [c async for c in stub.Generate(pb.GenerateRequest(model="scout", text="the herd", sampling=options))]
        try:
            bad = pb.SamplingOptions(max_tokens=4, n=17)
            async for _ in stub.Generate(pb.GenerateRequest(model="scout", text="x", sampling=bad)):
                pass
        except grpc.aio.AioRpcError as err:
            return chunks, err
        return chunks, None

    chunks, refused = _with_server(gateway, body)
    assert {c.index for c in chunks} == {0, 1}
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        assert sum(len(c.token_ids) for c in mine) == 4
        assert mine[-1].finish_reason == "length" and mine[-1].usage.completion_tokens == 4
    assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "n" in refused.details()


def test_tenancy_bills_every_choice_once_and_refuses_n_past_the_tenants_concurrency(tmp_path, core):
    store = TenantStore(connect(f"sqlite:///{tmp_path / 'herd.db'}"))
    migrate(store.engine)
    ledger = UsageLedger(store, flush_interval_s=0.05)
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=8, max_queued_requests=8)},
                      guard=Guard(store, InProcessRateLimiter(), ledger))
    store.create_tenant("a", allowed_models=["*"], max_concurrent=3)
    key = store.issue_key("a")[1]

    async def main():
        ledger.start()
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://herd",
                                     headers={"authorization": f"Bearer {key}"}) as client:
            ok = await client.post("/v1/completions", json={**PLAIN, "n": 3})
            streamed = await client.post("/v1/completions", json={**PLAIN, "n": 2, "stream": True})
            too_many = await client.post("/v1/completions", json={**PLAIN, "n": 4})
        await ledger.close()
        return ok, streamed, too_many

    ok, streamed, too_many = asyncio.run(main())
    assert ok.status_code == 200, ok.text
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    rows = [r for r in store.usage_rows("a") if r.status == "ok"]
    assert [r.completion_tokens for r in rows] == [15, 10], "every choice's tokens, once"
    assert rows[0].prompt_tokens == ok.json()["usage"]["prompt_tokens"], "the prompt once"
    assert streamed.status_code == 200 and len(store.usage_rows("a")) == 2, "the refused request writes no row"


def test_more_choices_than_the_replica_runs_at_once_is_400_naming_n(tiny_path):
    small = ReplicaCore(ReplicaConfig(name="scout", path=str(tiny_path), shards=0,
                                      engine=EngineConfig(kv_cache_mb=16, max_num_seqs=2, max_model_len=512)))
    gateway = Gateway({"scout": LocalBackend(small, max_ongoing_requests=4, max_queued_requests=2)})
    reply = _post(gateway, "/v1/completions", {**PLAIN, "n": 3})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "n" and "max_num_seqs" in reply.json()["error"]["message"]
    assert _post(gateway, "/v1/completions", {**PLAIN, "n": 2}).status_code == 200


class TwoChoices:
    """Answers with two choices interleaved chunk by chunk: a tool call (index 0) and plain text (index 1)."""

    TEXTS = ('[get_weather(city="Paris")]', "Sunny, 21 degrees.")

    def __init__(self, tokenizer):
        self.name, self.tokenizer, self.image_prompts = "scout", tokenizer, None

    def card(self):
        return pb.ModelCard(id="scout", root="", max_model_len=4096, created=1)

    async def generate(self, request):
        pieces = [[text[i : i + 6] for i in range(0, len(text), 6)] for text in self.TEXTS]
        for step in range(max(len(p) for p in pieces)):
            for index, mine in enumerate(pieces):
                if step < len(mine):
                    last = step == len(mine) - 1
                    yield pb.GenerateChunk(request_id=request.request_id, index=index, text=mine[step], token_ids=[1],
                                           finish_reason="stop" if last else "",
                                           usage=pb.Usage(prompt_tokens=3, completion_tokens=len(mine))
                                           if last else None)

    async def stats(self):
        return {}

    async def healthy(self):
        return True

    async def ready_replicas(self):
        return 1


def test_tool_calls_are_parsed_per_choice_whole_and_streamed(core):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    body = {"model": "scout", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather],
            "n": 2}
    gateway = Gateway({"scout": TwoChoices(core.tokenizer)})
    whole = _post(gateway, "/v1/chat/completions", body).json()
    first, second = whole["choices"]
    assert first["finish_reason"] == "tool_calls" and first["message"]["tool_calls"][0]["function"]["name"] == \
        "get_weather"
    assert second["finish_reason"] == "stop" and second["message"]["content"] == TwoChoices.TEXTS[1]
    assert second["message"]["tool_calls"] is None
    assert whole["usage"]["completion_tokens"] == 5 + 3
    events = _events(_post(gateway, "/v1/chat/completions", {**body, "stream": True}).text)
    choices = [c for e in events for c in e["choices"]]
    ends = sorted((c["index"], c["finish_reason"]) for c in choices if c["finish_reason"])
    assert ends == [(0, "tool_calls"), (1, "stop")]
    calls = [c for c in choices if "tool_calls" in c["delta"] and c["delta"]["tool_calls"]]
    assert [c["index"] for c in calls] == [0]
    text = "".join(c["delta"].get("content") or "" for c in choices if c["index"] == 1)
    assert text == TwoChoices.TEXTS[1]
