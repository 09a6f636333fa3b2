"""A request whose replica dies mid-stream continues on another: the client's stream is the undisturbed one."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest

from herd.engine import EngineConfig
from herd.engine.detokenizer import IncrementalDetokenizer
from herd.engine.errors import Code, HerdError
from herd.model.prompt import prompt_ids
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.cold_start import ColdStartPolicy
from herd.platform.gateway.continuation import Progress, continuation, migratable, replica_lost
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.errors import from_replica, replica_unavailable
from herd.platform.gateway.http_app import create_app
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore
from tests.unit.platform.gateway.test_http_app import RecordingGuard


@pytest.fixture
def core(tiny_path):
    """The in-process replica, streaming a message every step (stream_interval_s 0): a death after k tokens then
    comes mid-stream however fast the engine runs (with the 50 ms default, a quiet machine delivered the remaining
    tokens in the final message, and the replica never died)."""
    config = ReplicaConfig(name="scout", path=str(tiny_path), shards=2, transport="local", stream_interval_s=0,
                           engine=EngineConfig(kv_cache_mb=16, max_num_seqs=16, max_model_len=512))
    return ReplicaCore(config)


CHAT = {"model": "scout", "messages": [{"role": "user", "content": "Tell me about the herd."}],
        "max_tokens": 12, "temperature": 0}


class DyingBackend(LocalBackend):
    """The in-process replica, whose stream dies as a dead replica's does once attempt i has streamed `deaths[i]`
    tokens (at the end of the chunk that reaches them, unless it is the last one)."""

    def __init__(self, core, deaths: list[int]) -> None:
        super().__init__(core, max_ongoing_requests=4, max_queued_requests=4)
        self.deaths = list(deaths)
        self.requests: list[pb.GenerateRequest] = []

    async def generate(self, request):
        self.requests.append(request)
        death = self.deaths.pop(0) if self.deaths else None
        if death == 0:
            raise replica_unavailable("the replica died (test)", request_id=request.request_id)
        async with contextlib.aclosing(super().generate(request)) as chunks:
            tokens = 0
            async for chunk in chunks:
                yield chunk
                tokens += len(chunk.token_ids)
                if death is not None and tokens >= death and not chunk.finish_reason:
                    raise replica_unavailable("the replica died (test)", request_id=request.request_id)


def _gateway(core, deaths, **kwargs):
    backend = DyingBackend(core, deaths)
    return Gateway({"scout": backend}, **kwargs), backend


def _client(gateway):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://herd")


def _post(gateway, path, body):
    async def main():
        async with _client(gateway) as client:
            return await client.post(path, json=body)
    return asyncio.run(main())


def _streamed_text(reply):
    lines = [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    text = "".join(e["choices"][0].get("text") or "" for e in events if e["choices"])
    return text, events[-1]["usage"], [e["choices"][0]["finish_reason"] for e in events if e["choices"]]


SEEDED = {**CHAT, "temperature": 1.0, "seed": 11, "ignore_eos": True}


@pytest.mark.parametrize(("deaths", "body"), [([1], CHAT), ([1, 1], CHAT), ([3], SEEDED), ([1, 2], SEEDED)])
def test_a_chat_continues_with_the_undisturbed_text_and_usage(core, gateway, deaths, body):
    """Greedy, and seeded sampling: each draw is keyed by the seed and its output position, which the continuation
    carries on from (output_offset)."""
    undisturbed = _post(gateway, "/v1/chat/completions", body).json()
    migrating, backend = _gateway(core, deaths)
    reply = _post(migrating, "/v1/chat/completions", body)
    assert reply.status_code == 200
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == undisturbed["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == undisturbed["choices"][0]["finish_reason"]
    assert body["usage"]["prompt_tokens"] == undisturbed["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == undisturbed["usage"]["completion_tokens"]
    assert len(backend.requests) == len(deaths) + 1
    first = backend.requests[0]
    for attempt, sent in enumerate(backend.requests[1:], 1):
        assert sent.request_id == f"{first.request_id}-r{attempt}"
        assert len(sent.token_ids.ids) + sent.sampling.max_tokens == len(first.token_ids.ids) + 12
        assert sent.sampling.output_offset == len(sent.token_ids.ids) - len(first.token_ids.ids)
    assert migrating.telemetry.metrics.migrated.labels("scout")._value.get() == len(deaths)
    assert migrating.load.snapshot()["scout"]["in_flight"] == 0


def test_a_streamed_completion_continues_token_for_token(core, gateway):
    body = {"model": "scout", "prompt": "The herd", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    undisturbed = _streamed_text(_post(gateway, "/v1/completions", body))
    migrating, _ = _gateway(core, [4])
    text, usage, finishes = _streamed_text(_post(migrating, "/v1/completions", body))
    assert (text, usage) == undisturbed[:2] and [f for f in finishes if f] == [f for f in undisturbed[2] if f]


def test_token_ids_continue_without_a_repeat_or_a_gap(core):
    request = pb.GenerateRequest(model="scout", token_ids=pb.TokenIds(ids=core.tokenizer.encode("The herd")),
                                 sampling=pb.SamplingOptions(max_tokens=9, temperature=0, ignore_eos=True),
                                 request_id="herd-t", tenant=pb.TenantContext(tenant_id="default", weight=1.0))
    from herd.platform.gateway.core import Prepared

    async def collect(gw):
        prepared = Prepared(backend=gw.backends["scout"], request=request, prompt_tokens=len(request.token_ids.ids))
        return [c async for c in gw.stream(prepared)]

    plain, _ = _gateway(core, [])
    migrating, _ = _gateway(core, [3, 3])
    undisturbed, continued = asyncio.run(collect(plain)), asyncio.run(collect(migrating))
    assert [t for c in continued for t in c.token_ids] == [t for c in undisturbed for t in c.token_ids]
    assert "".join(c.text for c in continued) == "".join(c.text for c in undisturbed)
    assert {c.request_id for c in continued} == {"herd-t"}
    assert continued[-1].usage == undisturbed[-1].usage or (
        continued[-1].usage.completion_tokens == 9 and continued[-1].usage.prompt_tokens == len(request.token_ids.ids))


def test_a_stop_string_across_the_boundary_ends_the_text_where_it_would_have(core, gateway):
    """The first attempt dies after its first token; the stop string starts in that token's text (which the dead
    replica held back, as it could begin a stop string) and ends in the next one's."""
    completion = {"model": "scout", "prompt": "The herd", "max_tokens": 12, "temperature": 0}
    whole = _post(gateway, "/v1/completions", completion).json()["choices"][0]["text"]
    first = _chunks(core, prompt_ids(core.tokenizer, "The herd", core.tokenizer.vocab_size), 12)[0]
    assert len(first.token_ids) == 1 and first.text and whole.startswith(first.text)
    stop = whole[len(first.text) - 1: len(first.text) + 1]
    body = {**completion, "stop": [stop]}
    undisturbed = _post(gateway, "/v1/completions", body).json()
    migrating, backend = _gateway(core, [1])
    continued = _post(migrating, "/v1/completions", body).json()
    assert len(backend.requests) == 2
    assert continued["choices"][0]["text"] == undisturbed["choices"][0]["text"] == whole[: whole.index(stop)]
    assert continued["choices"][0]["finish_reason"] == undisturbed["choices"][0]["finish_reason"] == "stop"
    assert continued["usage"]["completion_tokens"] == undisturbed["usage"]["completion_tokens"]


def _chunks(core, prompt, max_tokens):
    request = pb.GenerateRequest(model="scout", token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingOptions(max_tokens=max_tokens, temperature=0), request_id="herd-c",
                                 tenant=pb.TenantContext(tenant_id="default", weight=1.0))

    async def main():
        return [c async for c in core.generate(request)]
    return asyncio.run(main())


def test_a_request_that_streamed_nothing_is_sent_again_as_it_was(core, gateway):
    undisturbed = _post(gateway, "/v1/chat/completions", CHAT).json()
    migrating, backend = _gateway(core, [0])
    body = _post(migrating, "/v1/chat/completions", CHAT).json()
    assert body["choices"][0]["message"]["content"] == undisturbed["choices"][0]["message"]["content"]
    first, retry = backend.requests
    assert retry.token_ids == first.token_ids and retry.sampling == first.sampling
    assert retry.request_id == first.request_id + "-r1"


def test_past_the_attempts_a_503_with_retry_after_and_nothing_internal(core):
    migrating, backend = _gateway(core, [1, 1, 1])
    reply = _post(migrating, "/v1/chat/completions", CHAT)
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    message = reply.json()["error"]["message"]
    assert "test" not in message and "died" not in message and message.startswith("the model is unavailable")
    assert len(backend.requests) == 3  # the first and 2 more (migration_attempts)

    none, backend = _gateway(core, [1], migration_attempts=0)
    assert _post(none, "/v1/chat/completions", CHAT).status_code == 503 and len(backend.requests) == 1


def test_several_choices_are_not_continued(core):
    migrating, backend = _gateway(core, [1])
    reply = _post(migrating, "/v1/chat/completions", {**CHAT, "n": 2, "temperature": 0.5})
    assert reply.status_code == 503 and len(backend.requests) == 1


def test_a_replicas_own_unavailable_is_not_migrated():
    own = from_replica(HerdError(Code.UNAVAILABLE, "replica of scout is shutting down"))
    assert own.code is Code.UNAVAILABLE and not replica_lost(own)
    assert replica_lost(replica_unavailable("gone"))


def _request(**sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="scout", token_ids=pb.TokenIds(ids=[1, 2, 3]), request_id="herd-x",
                              sampling=pb.SamplingOptions(**{"max_tokens": 10, **sampling}),
                              tenant=pb.TenantContext(tenant_id="t", weight=2.0), trace_context={"traceparent": "p"},
                              adapter=pb.LoraAdapter(name="a@1", path="/a"))


def test_the_continuation_carries_the_streamed_tokens_and_asks_for_the_rest():
    original = _request(min_tokens=5, echo=True, prompt_logprobs=2, logprobs=1, temperature=0, stop=["x"])
    out = continuation(original, [7, 8], 2)
    assert list(out.token_ids.ids) == [1, 2, 3, 7, 8] and out.request_id == "herd-x-r2"
    assert out.sampling.max_tokens == 8 and out.sampling.min_tokens == 3 and out.sampling.output_offset == 2
    assert not out.sampling.echo and not out.sampling.HasField("prompt_logprobs")
    assert out.sampling.logprobs == 1 and list(out.sampling.stop) == ["x"] and out.sampling.temperature == 0
    assert out.tenant == original.tenant and out.adapter == original.adapter
    assert out.trace_context == original.trace_context
    assert list(original.token_ids.ids) == [1, 2, 3] and original.sampling.max_tokens == 10  # not changed
    assert continuation(_request(min_tokens=1), [7, 8], 1).sampling.min_tokens == 0


def test_which_requests_can_continue():
    assert migratable(_request()) and migratable(_request(n=1, seed=3, repetition_penalty=1.2))
    assert not migratable(_request(n=2)) and not migratable(_request(best_of=2))
    assert not migratable(_request(structured=pb.StructuredOutput(json_object=True)))
    assert not migratable(_request(presence_penalty=0.5)) and not migratable(_request(frequency_penalty=0.5))


def test_a_character_split_over_the_boundary_is_not_lost(core):
    """The first replica held back a character's first bytes; the new one starts after them."""
    tokenizer = core.tokenizer
    text = "herd é 世界 🐘 ok"
    ids = tokenizer.encode(text)
    split = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert split, "the tiny tokenizer splits a character over tokens (else this test proves nothing)"
    k = split[0]
    progress = Progress(_request(max_tokens=len(ids), temperature=0), tokenizer)
    first = IncrementalDetokenizer(tokenizer)  # the dead replica's, token by token
    sent = [progress.relay(pb.GenerateChunk(request_id="herd-x", token_ids=[t], text=first.push(ids[: i + 1])))
            for i, t in enumerate(ids[:k])]
    retry = progress.next_request()
    assert list(retry.token_ids.ids)[3:] == ids[:k]
    second = IncrementalDetokenizer(tokenizer)  # the new replica's: its output tokens only
    rest = ids[k:]
    for i, t in enumerate(rest):
        last = i == len(rest) - 1
        piece = second.flush(rest) if last else second.push(rest[: i + 1])
        chunk = pb.GenerateChunk(request_id="herd-x-r1", token_ids=[t], text=piece, finish_reason="length" if last
                                 else "", usage=pb.Usage(prompt_tokens=3 + k, completion_tokens=len(rest),
                                                         cached_tokens=9 if last else 0))
        sent.append(progress.relay(chunk))
    assert "".join(c.text for c in sent) == tokenizer.decode(ids)
    assert sent[-1].usage == pb.Usage(prompt_tokens=3, completion_tokens=len(ids), cached_tokens=3)
    assert progress.finished and {c.request_id for c in sent} == {"herd-x"}


def test_a_continued_request_is_settled_once_for_every_token(core, gateway):
    plain = _post(gateway, "/v1/chat/completions", CHAT).json()
    guard = RecordingGuard()
    migrating, _ = _gateway(core, [1, 1], guard=guard)

    async def main():
        async with _client(migrating) as client:
            return await client.post("/v1/chat/completions", json=CHAT,
                                     headers={"authorization": f"Bearer {guard.KEY}"})

    assert asyncio.run(main()).status_code == 200
    assert [(s["completion_tokens"], s["status"]) for s in guard.settled] == [
        (plain["usage"]["completion_tokens"], "ok")]


def test_a_request_whose_only_replica_died_is_held_for_its_restart(core, gateway):
    class Restarting(DyingBackend):
        def __init__(self, core):
            super().__init__(core, [1])
            self.counts = [1, 0, 0, 1]  # ready replicas, as asked: before the request, then while it restarts

        async def ready_replicas(self):
            return self.counts.pop(0) if self.counts else 1

    backend = Restarting(core)
    migrating = Gateway({"scout": backend}, cold_start={"scout": ColdStartPolicy(wait_s=60, poll_s=0.01)})
    plain = _post(gateway, "/v1/chat/completions", CHAT).json()
    body = _post(migrating, "/v1/chat/completions", CHAT).json()
    assert body["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert not backend.counts and len(backend.requests) == 2


def test_a_request_that_had_sent_all_its_tokens_ends_with_length():
    class Chars:  # a tokenizer of one character per token
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    progress = Progress(_request(max_tokens=3), Chars())
    for token in (104, 105, 33):
        progress.relay(pb.GenerateChunk(request_id="herd-x", token_ids=[token], text=chr(token)))
    progress.next_request()
    assert progress.remaining() == 0
    last = progress.length_reached()
    assert (last.finish_reason, last.text, list(last.token_ids)) == ("length", "", [])
    assert last.usage == pb.Usage(prompt_tokens=3, completion_tokens=3) and progress.finished
