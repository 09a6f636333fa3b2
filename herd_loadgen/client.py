"""The client: N concurrent streaming requests against an OpenAI-compatible server, timed on its own clock.

Every number is taken from the bytes received. TTFT runs from sending a request to its first non-empty content
delta; ITL is the gap between consecutive non-empty content chunks (a chunk may carry several tokens, so ITL is
per chunk); output tokens come from the usage the server reports in its last chunk, else one per content chunk.
A failed request (HTTP status, error event, broken stream, exception) is recorded as an error and the run goes
on. Throughput counts the tokens of requests that succeeded over the wall time of the whole run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from herd_loadgen.results import LoadResult, RequestRecord
from herd_loadgen.workload import Request

ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}
ExtraBody = Mapping[str, Any] | Callable[[Request], Mapping[str, Any]]


async def run_load(
    base_url: str,
    model: str,
    workload: Sequence[Request],
    *,
    concurrency: int,
    endpoint: str = "chat",
    api_key: str | None = None,
    timeout_s: float = 300.0,
    extra_body: ExtraBody | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> LoadResult:
    """Send every request of `workload` as a streaming greedy request, `concurrency` at a time.

    base_url is the server's root or its /v1; timeout_s bounds connecting and each read of the stream;
    extra_body (a dict, or a function of the request) is merged into every body last, so it may override.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}")
    if not workload:
        raise ValueError("workload is empty")
    path = _api_root(base_url) + ENDPOINTS[endpoint]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    pending = deque(workload)
    records: list[RequestRecord] = []
    in_flight = [0, 0]  # now, most

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, headers=headers,
                                 transport=transport) as client:
        start = time.perf_counter()

        async def worker() -> None:
            while pending:  # one event loop: nothing runs between this test and popleft
                request = pending.popleft()
                in_flight[0] += 1
                in_flight[1] = max(in_flight[1], in_flight[0])
                body = _body(model, request, endpoint, extra_body)
                records.append(await _send(client, path, body, request.index, start))
                in_flight[0] -= 1

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(workload)))))
        wall = time.perf_counter() - start
    records.sort(key=lambda r: r.index)
    return LoadResult(concurrency=concurrency, wall_s=wall, records=records, max_in_flight=in_flight[1])


def _api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def _body(model: str, request: Request, endpoint: str, extra_body: ExtraBody | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0, "max_tokens": request.max_tokens,
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    extra = extra_body(request) if callable(extra_body) else extra_body
    body.update(extra or {})
    return body


async def _send(client: httpx.AsyncClient, url: str, body: dict[str, Any], index: int, t0: float) -> RequestRecord:
    sent = time.perf_counter()
    record = RequestRecord(index=index, start_s=sent - t0)
    try:
        async with client.stream("POST", url, json=body) as response:
            record.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:300]}"
            else:
                await _read_stream(response, record, sent)
    except Exception as err:  # whatever the network or the server does to one request is that request's result
        record.error = f"{type(err).__name__}: {err}"[:300]
    record.end_s = time.perf_counter() - t0
    return record


async def _read_stream(response: httpx.Response, record: RequestRecord, sent: float) -> None:
    """Parse the server-sent events of one streaming completion into `record`."""
    last: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    ended = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` lines
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            ended = True
            break
        event = json.loads(data)
        if event.get("error") is not None:
            record.error = f"error event: {json.dumps(event['error'])[:300]}"
            return
        usage = event.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            usage_tokens = int(usage["completion_tokens"])
        for choice in event.get("choices") or ():
            ended = ended or bool(choice.get("finish_reason"))
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if text:
                now = time.perf_counter()
                if last is None:
                    record.ttft_s = now - sent
                else:
                    record.itl_s.append(now - last)
                last = now
                chunks += 1
    record.output_tokens = usage_tokens if usage_tokens is not None else chunks
    if not ended:
        record.error = "stream ended before [DONE] or a finish_reason"


