"""The gateway's one request path: what runs before authorisation, and how it stops."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from herd.engine.errors import HerdError
from herd.platform.gateway import openai_translate as translate
from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.errors import http_status
from herd.platform.gateway.image_urls import ImageUrlPolicy
from herd.platform.gateway.openai_models import ChatCompletionRequest
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import InProcessRateLimiter
from herd.platform.tenancy.store import TenantStore
from herd.protos.herd.v1 import inference_pb2 as pb


@pytest.fixture
def tenancy(tmp_path, core):
    store = TenantStore(connect(f"sqlite:///{tmp_path / 'herd.db'}"))
    migrate(store.engine)
    guard = Guard(store, InProcessRateLimiter(), UsageLedger(store))
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=8, max_queued_requests=8)}, guard=guard)
    store.create_tenant("nothing", allowed_models=["maverick"])
    store.create_tenant("all", allowed_models=["*"])
    return gateway, store


def _image_chat(model: str) -> ChatCompletionRequest:
    parts = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "https://images.example/cat.png"}}]
    return ChatCompletionRequest.model_validate({"model": model, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": parts}]})


@pytest.mark.parametrize(("model", "status"), [("scout", 403), ("llama-5", 404)])
def test_no_image_url_is_fetched_for_a_model_the_caller_may_not_use(tenancy, monkeypatch, model, status):
    gateway, store = tenancy
    fetched: list[str] = []

    async def spy(url: str, policy: ImageUrlPolicy) -> bytes:
        fetched.append(url)
        raise AssertionError("fetched before the model was authorised")

    monkeypatch.setattr(translate, "image_bytes", spy)

    async def main() -> HerdError:
        identity = await gateway.identify(store.issue_key("nothing")[1])
        with pytest.raises(HerdError) as caught:
            await translate.prepare_chat(gateway, _image_chat(model), identity, ImageUrlPolicy(fetch_urls=True))
        return caught.value

    error = asyncio.run(main())
    assert http_status(error) == status and fetched == []


def test_too_many_image_urls_are_refused_before_any_is_fetched(tenancy, monkeypatch):
    gateway, store = tenancy
    gateway.max_images_per_request = 1
    fetched: list[str] = []

    async def spy(url: str, policy: ImageUrlPolicy) -> bytes:
        fetched.append(url)
        return b""

    monkeypatch.setattr(translate, "image_bytes", spy)
    body = _image_chat("scout")
    body.messages[0].content += body.messages[0].content[1:]  # type: ignore[operator]

    async def main() -> HerdError:
        identity = await gateway.identify(store.issue_key("all")[1])
        with pytest.raises(HerdError) as caught:
            await translate.prepare_chat(gateway, body, identity, ImageUrlPolicy(fetch_urls=True))
        return caught.value

    assert http_status(asyncio.run(main())) == 400 and fetched == []


def test_tokenising_runs_off_the_event_loop(gateway):
    tokenizer = gateway.backends["scout"].tokenizer
    threads: list[threading.Thread] = []
    encode = tokenizer.encode

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return encode(*args, **kwargs)

    async def main() -> threading.Thread:
        loop_thread = threading.current_thread()
        tokenizer.encode = spy
        try:
            await gateway.prepare_text("scout", "Tell me about the herd.", pb.SamplingOptions(max_tokens=2))
            await gateway.prepare_chat("scout", [{"role": "user", "content": "Hello"}],
                                       pb.SamplingOptions(max_tokens=2))
        finally:
            del tokenizer.encode
        return loop_thread

    loop_thread = asyncio.run(main())
    assert threads and loop_thread not in threads


class Settlements:
    """A stand-in guard that admits everyone and keeps each settlement."""

    def __init__(self) -> None:
        self.settled: list[dict[str, Any]] = []

    async def authenticate(self, credential: str | None) -> Any:
        return "caller"

    def authorize(self, identity: Any, model: str) -> None:
        pass

    def adapters(self, identity: Any) -> dict[str, Any]:
        return {}

    def allowed_models(self, identity: Any, models: list[str]) -> list[str]:
        return models

    def context(self, identity: Any) -> pb.TenantContext:
        return pb.TenantContext(tenant_id="t", weight=1.0)

    async def enter(self, identity: Any, model: str, request_id: str, *, choices: int = 1,
                    adapter: str | None = None) -> Any:
        return request_id

    async def reserve(self, admission: Any, prompt_tokens: int, max_tokens: int, *,
                      max_tokens_given: bool = True) -> None:
        pass

    async def settle(self, admission: Any, *, completion_tokens: int, cached_tokens: int, status: str) -> None:
        self.settled.append({"request": admission, "completion_tokens": completion_tokens, "status": status})


def test_shutdown_refuses_new_requests_and_interrupts_those_in_flight_billing_what_they_streamed(core):
    guard = Settlements()
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=8, max_queued_requests=8)}, guard=guard)

    async def main() -> tuple[int, HerdError, HerdError, bool]:
        prepared = await gateway.prepare_text("scout", "Once upon a time",
                                              pb.SamplingOptions(max_tokens=400, temperature=0, ignore_eos=True))
        chunks = gateway.stream(prepared)
        streamed = len((await anext(chunks)).token_ids)
        gateway.begin_shutdown()
        with pytest.raises(HerdError) as refused:
            await gateway.prepare_text("scout", "Hello", pb.SamplingOptions(max_tokens=2))
        assert not await gateway.drain(0.05), "the first request is still streaming"
        gateway.interrupt()
        with pytest.raises(HerdError) as interrupted:
            while True:
                streamed += len((await anext(chunks)).token_ids)
        return streamed, refused.value, interrupted.value, await gateway.drain(1.0)

    streamed, refused, interrupted, drained = asyncio.run(main())
    assert http_status(refused) == 503 and refused.retry_after_s is not None
    assert http_status(interrupted) == 503 and interrupted.reason == "interrupted"
    assert drained and gateway.in_flight == 0
    assert guard.settled == [{"request": guard.settled[0]["request"], "completion_tokens": streamed,
                               "status": "interrupted"}]
    assert 0 < streamed < 400


def test_sampling_limits_hold_for_whatever_door_builds_the_options(gateway):
    """The gRPC door passes SamplingOptions through as the client sent them: the gateway refuses what the
    engine would not take before tokenising (4 million short stop strings once cost every tenant a second per
    step)."""
    cases = {"stop": pb.SamplingOptions(max_tokens=2, stop=["x"] * 10_000),
             "stop_token_ids": pb.SamplingOptions(max_tokens=2, stop_token_ids=list(range(1000))),
             "logprobs": pb.SamplingOptions(max_tokens=2, logprobs=1000)}

    async def main() -> dict[str, HerdError]:
        refused = {}
        for field, options in cases.items():
            with pytest.raises(HerdError) as caught:
                await gateway.prepare_chat("scout", [{"role": "user", "content": "Hi"}], options)
            refused[field] = caught.value
        return refused

    for field, error in asyncio.run(main()).items():
        assert http_status(error) == 400 and error.param == field, (field, error.message)


def test_a_tenant_over_its_rate_is_refused_before_any_image_is_fetched(tenancy, monkeypatch):
    gateway, store = tenancy
    store.create_tenant("slow", allowed_models=["*"], requests_per_min=1)
    fetched: list[str] = []

    async def spy(url: str, policy: ImageUrlPolicy) -> bytes:
        fetched.append(url)
        raise AssertionError("fetched for a request over its rate")

    monkeypatch.setattr(translate, "image_bytes", spy)

    async def main() -> HerdError:
        identity = await gateway.identify(store.issue_key("slow")[1])
        prepared = await gateway.prepare_text("scout", "Hello", pb.SamplingOptions(max_tokens=2), identity=identity)
        async for _ in gateway.stream(prepared):
            pass
        with pytest.raises(HerdError) as caught:
            await translate.prepare_chat(gateway, _image_chat("scout"), identity, ImageUrlPolicy(fetch_urls=True))
        return caught.value

    error = asyncio.run(main())
    assert http_status(error) == 429 and error.reason == "requests_per_min" and fetched == []
    assert gateway.telemetry.metrics.rejected.labels("RESOURCE_EXHAUSTED")._value.get() == 1


def test_a_request_refused_after_admission_gives_its_slot_back_and_writes_no_row(tenancy):
    gateway, store = tenancy
    store.create_tenant("one", allowed_models=["*"], max_concurrent=1, max_output_tokens=4)

    async def main() -> tuple[HerdError, int]:
        identity = await gateway.identify(store.issue_key("one")[1])
        with pytest.raises(HerdError) as caught:  # over the tenant's output cap: found once tokenised
            await gateway.prepare_text("scout", "Hello", pb.SamplingOptions(max_tokens=8), identity=identity)
        prepared = await gateway.prepare_text("scout", "Hello", pb.SamplingOptions(max_tokens=2), identity=identity)
        streamed = sum([len(c.token_ids) async for c in gateway.stream(prepared)])
        await gateway.guard.ledger.flush()
        return caught.value, streamed

    refused, streamed = asyncio.run(main())
    assert http_status(refused) == 400 and streamed == 2, "the slot came back: the next request was served"
    assert [(r.status, r.completion_tokens) for r in store.usage_rows("one")] == [("ok", 2)]


def test_a_backend_that_fails_midway_settles_its_request_as_internal(core):
    class Failing(LocalBackend):
        async def generate(self, request: pb.GenerateRequest) -> Any:
            async for chunk in super().generate(request):
                yield chunk
                raise RuntimeError("10.0.0.7:50061 is down")

    guard = Settlements()
    gateway = Gateway({"scout": Failing(core)}, guard=guard)

    async def main() -> int:
        prepared = await gateway.prepare_text("scout", "Hello", pb.SamplingOptions(max_tokens=40, ignore_eos=True))
        streamed = 0
        with pytest.raises(RuntimeError):
            async for chunk in gateway.stream(prepared):
                streamed += len(chunk.token_ids)
        return streamed

    streamed = asyncio.run(main())
    assert [(s["status"], s["completion_tokens"]) for s in guard.settled] == [("internal", streamed)]


def test_a_task_cancelled_while_it_reads_a_stream_ends_cancelled_and_frees_the_request(gateway):
    """Found by the batch runner, which aborts a line by cancelling its task: the stream's pending read must stop
    before the backend's stream is closed, or the close fails ('already running') in place of the cancel."""
    async def main():
        prepared = await gateway.prepare_text("scout", "Tell me about the herd.",
                                              pb.SamplingOptions(max_tokens=400, ignore_eos=True),
                                              request_id="batch_x-0")
        first = asyncio.Event()

        async def read():
            async for _ in gateway.stream(prepared):
                first.set()

        task = asyncio.create_task(read())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return prepared.request.request_id, gateway.in_flight

    request_id, in_flight = asyncio.run(main())
    assert request_id == "batch_x-0", "the caller's request id is the request's"
    assert in_flight == 0
