"""The load generator against a fake OpenAI-compatible streaming server on 127.0.0.1 (uvicorn in a thread).

The fake server streams `max_tokens` tokens, `tokens_per_chunk` per chunk, after sleeping `first_s` and
then `gap_s` between chunks (all set per request through extra_body); every `fail_every`-th request it
receives gets a 429. It counts the requests it holds open at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import herd_loadgen as loadgen
from herd_loadgen import LoadResult, RequestRecord, make_workload, run_load


@dataclass
class FakeState:
    received: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: list[dict[str, Any]] | None = None

    def reset(self) -> None:
        self.received = self.in_flight = self.max_in_flight = 0
        self.bodies = []


def fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    async def completion(request: Request, chat: bool) -> Response:
        body = await request.json()
        assert state.bodies is not None
        state.bodies.append(body)
        state.received += 1
        fail_every = body.get("fail_every")
        if fail_every and state.received % fail_every == 0:
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        return StreamingResponse(events(body, chat), media_type="text/event-stream")

    async def events(body: dict[str, Any], chat: bool) -> AsyncIterator[str]:
        try:
            tokens, per_chunk = body["max_tokens"], body.get("tokens_per_chunk", 1)
            if chat:
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            await asyncio.sleep(body.get("first_s", 0.0))
            for sent in range(0, tokens, per_chunk):
                if sent:
                    await asyncio.sleep(body.get("gap_s", 0.0))
                text = "x" * min(per_chunk, tokens - sent)
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                yield _sse({"choices": [choice]})
            last = {"index": 0, "delta": {}, "finish_reason": "length"} if chat else {"index": 0, "text": "",
                                                                                       "finish_reason": "length"}
            yield _sse({"choices": [last]})
            if body.get("stream_options", {}).get("include_usage") and not body.get("no_usage"):
                yield _sse({"choices": [], "usage": {"completion_tokens": tokens, "prompt_tokens": 3}})
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await completion(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion(request, chat=False)

    return app


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event)}\n\n"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, FakeState]]:
    state = FakeState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # listening before uvicorn starts: early connections wait in the backlog
    config = uvicorn.Config(fake_app(state), log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def fake(server: tuple[str, FakeState]) -> tuple[str, FakeState]:
    server[1].reset()
    return server


def test_workload_is_deterministic_and_in_range() -> None:
    a = make_workload(50, seed=7, prompt_words=(3, 9), max_tokens=(2, 5))
    assert a == make_workload(50, seed=7, prompt_words=(3, 9), max_tokens=(2, 5))
    assert a != make_workload(50, seed=8, prompt_words=(3, 9), max_tokens=(2, 5))
    assert [r.index for r in a] == list(range(50))
    assert all(3 <= len(r.prompt.split()) <= 9 and 2 <= r.max_tokens <= 5 for r in a)
    assert len({len(r.prompt.split()) for r in a}) > 3 and len({r.max_tokens for r in a}) == 4
    with pytest.raises(ValueError, match="max_tokens"):
        make_workload(3, seed=0, max_tokens=(5, 2))


def test_token_counts_come_from_usage_not_chunks(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    workload = make_workload(6, seed=0, max_tokens=(5, 12))
    result = asyncio.run(run_load(url, "fake", workload, concurrency=3, timeout_s=5,
                                  extra_body={"tokens_per_chunk": 3}))
    assert [r.output_tokens for r in result.records] == [r.max_tokens for r in workload]
    summary = result.summary()
    assert summary["errors"] == 0 and summary["output_tokens"] == sum(r.max_tokens for r in workload)
    assert summary["output_tok_per_s"] == pytest.approx(summary["output_tokens"] / result.wall_s)
    body = state.bodies[0] if state.bodies else {}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0 and body["tokens_per_chunk"] == 3
    assert {b["messages"][0]["content"] for b in state.bodies or []} == {r.prompt for r in workload}


def test_without_usage_each_content_chunk_counts_one(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    workload = make_workload(2, seed=1, max_tokens=(6, 6))
    result = asyncio.run(run_load(url, "fake", workload, concurrency=2, endpoint="completions", timeout_s=5,
                                  extra_body={"tokens_per_chunk": 2, "no_usage": True}))
    assert [r.output_tokens for r in result.records] == [3, 3]
    assert all(r.ok for r in result.records)


def test_ttft_and_itl_follow_the_server_delays(fake: tuple[str, FakeState]) -> None:
    url, _ = fake
    workload = make_workload(4, seed=2, max_tokens=(4, 4))
    result = asyncio.run(run_load(url, "fake", workload, concurrency=4, timeout_s=5,
                                  extra_body={"first_s": 0.3, "gap_s": 0.1}))
    summary = result.summary()
    # Upper bounds loose for a busy machine, yet tight enough to catch a gap measured from the send. A gap
    # between two arrivals can fall a little under the server's sleep when the earlier chunk arrived late.
    assert 300 <= summary["ttft_p50_ms"] < 800
    assert all(len(r.itl_s) == 3 for r in result.records)
    assert 80 <= summary["itl_p50_ms"] < 250 and summary["itl_p99_ms"] < 300
    assert 0.6 <= result.wall_s < 1.5  # four requests in parallel: 0.3 + 3 * 0.1 once, not 2.4 s in a row


def test_errors_are_recorded_and_the_run_goes_on(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    workload = make_workload(12, seed=3, max_tokens=(2, 3))
    result = asyncio.run(run_load(url, "fake", workload, concurrency=4, timeout_s=5, extra_body={"fail_every": 3}))
    failed = [r for r in result.records if not r.ok]
    assert state.received == 12 and len(failed) == 4
    assert all(r.status == 429 and "HTTP 429" in (r.error or "") and "slow down" in (r.error or "") for r in failed)
    summary = result.summary()
    assert summary["errors"] == 4 and summary["requests"] == 12
    assert summary["output_tokens"] == sum(r.output_tokens for r in result.records if r.ok) > 0


def test_connection_failures_are_errors_not_exceptions() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    result = asyncio.run(run_load(f"http://127.0.0.1:{port}", "m", make_workload(3, seed=0), concurrency=2,
                                  timeout_s=2))
    assert result.summary()["errors"] == 3
    assert all(r.status is None and "ConnectError" in (r.error or "") for r in result.records)


def test_concurrency_is_respected(fake: tuple[str, FakeState]) -> None:
    url, state = fake
    workload = make_workload(9, seed=4, max_tokens=(3, 3))
    result = asyncio.run(run_load(url, "fake", workload, concurrency=3, timeout_s=5, extra_body={"gap_s": 0.05}))
    assert state.max_in_flight == 3 and result.max_in_flight == 3
    assert result.summary()["errors"] == 0


def test_percentile_interpolates() -> None:
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([4.0], 99) == 4.0
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert loadgen.percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_main_prints_a_row_per_level_and_plots(fake: tuple[str, FakeState], tmp_path: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    url, _ = fake
    png = tmp_path / "bench.png"
    code = loadgen.main(["--url", url + "/v1", "--model", "fake", "--concurrency", "1", "4", "--requests", "4",
                         "--max-tokens", "2", "4", "--label", "fake server", "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| fake server |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "4"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_survives_a_run_whose_every_request_failed(tmp_path: Any) -> None:
    """Zero tok/s and no TTFT at all (say, every request answered 401): a log axis has nothing to show."""
    pytest.importorskip("matplotlib")
    refused = [RequestRecord(index=i, start_s=0.0, status=401, error="HTTP 401") for i in range(4)]
    answered = [RequestRecord(index=0, start_s=0.0, ttft_s=0.05, output_tokens=8)]
    failed = {c: LoadResult(concurrency=c, wall_s=0.5, max_in_flight=c, records=refused) for c in (1, 4)}
    served = {c: LoadResult(concurrency=c, wall_s=1.0, max_in_flight=c, records=answered) for c in (1, 4)}
    for results in ({"down": failed}, {"down": failed, "up": served}, {}):
        png = loadgen.plot(results, tmp_path / f"{len(results)}.png", ceilings={"ceiling": 10.0})
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
