"""Load generator for any OpenAI-compatible server (`herd bench`): N concurrent streaming clients on a
fixed-seed workload of mixed prompt and output lengths.

Every number is taken on the client's clock from the bytes it received. TTFT runs from sending a request
to its first non-empty content delta; ITL is the gap between consecutive non-empty content chunks (a chunk
may carry several tokens, so ITL is per chunk); output tokens come from the usage the server reports in its
last chunk, else one per content chunk. A failed request (HTTP status, error event, broken stream,
exception) is recorded as an error and the run goes on. Throughput counts the tokens of requests that
succeeded over the wall time of the whole run.

It knows nothing of herd, so the same numbers can be taken from herd, transformers or vLLM:

    herd bench --url http://127.0.0.1:8000 --model NAME --concurrency 1 8 32 --requests 64 --seed 0 \\
               [--endpoint chat|completions] [--api-key KEY] [--plot out.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}

# Common English words: a tokenizer splits the rarer ones into several tokens, so prompts of equal word
# counts still differ in token counts.
_WORD_LIST = """
the of and to in is was for on that with as by at from his her they this which but be are had not have were
one all their there been has when who will more no if out so said what up its about into than them can only
other new some could time these two may then first any like now my over such our man me even most made after
also did many before must through back years where much your way well down should because each just those
people how too little state good very make world still own see men work long get here between both life
being under never day same another know while last might us great old year off come since against go came
right used take three states himself few house use during without again place around however home small found
thought went say part once general high upon school every course does government mountain river kitchen
lantern harbor violin meadow glacier orchard canyon thunder whisper velvet compass parchment quartz saffron
falcon cathedral labyrinth nebula tundra archipelago symphony chrysanthemum kaleidoscope metamorphosis
photosynthesis juxtaposition onomatopoeia quintessential serendipity bureaucracy electromagnetic
"""
WORDS = tuple(_WORD_LIST.split())


@dataclass(frozen=True, kw_only=True)
class Request:
    """One request of a workload."""

    index: int
    """Position in the workload; records are reported in this order."""
    prompt: str
    """The user message (chat) or the prompt text (completions)."""
    max_tokens: int
    """Most tokens the server may generate for it."""


@dataclass(kw_only=True)
class RequestRecord:
    """What one request did, on the client's clock (seconds since the run started)."""

    index: int
    """The request's index in the workload."""
    start_s: float
    """When it was sent."""
    end_s: float = 0.0
    """When its stream ended or it failed."""
    ttft_s: float | None = None
    """Send to first non-empty content delta; None if none came."""
    itl_s: list[float] = field(default_factory=list)
    """Gaps between consecutive content chunks."""
    output_tokens: int = 0
    """From the server's usage if it sent one, else the number of content chunks."""
    status: int | None = None
    """HTTP status; None if no response came."""
    error: str | None = None
    """Why it failed; None if it succeeded."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(kw_only=True)
class LoadResult:
    """One run of a workload at one concurrency."""

    concurrency: int
    """Clients sending at once."""
    wall_s: float
    """First send to last completion."""
    records: list[RequestRecord]
    """One per request, in workload order."""
    max_in_flight: int
    """Most requests the client had open at once."""

    def summary(self) -> dict[str, Any]:
        """Counts, output tokens/s, and TTFT and ITL percentiles in ms (None where nothing was measured)."""
        ok = [r for r in self.records if r.ok]
        tokens = sum(r.output_tokens for r in ok)
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        itl = [gap for r in ok for gap in r.itl_s]
        out: dict[str, Any] = {
            "concurrency": self.concurrency, "requests": len(self.records), "errors": len(self.records) - len(ok),
            "output_tokens": tokens, "wall_s": self.wall_s,
            "output_tok_per_s": tokens / self.wall_s if self.wall_s > 0 else 0.0,
        }
        for name, values in (("ttft", ttft), ("itl", itl)):
            for q in (50, 95, 99):
                value = percentile(values, q)
                out[f"{name}_p{q}_ms"] = None if value is None else value * 1e3
        return out

    def errors(self) -> list[str]:
        return [f"request {r.index}: {r.error}" for r in self.records if r.error is not None]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def make_workload(
    n: int, *, seed: int, prompt_words: tuple[int, int] = (8, 128), max_tokens: tuple[int, int] = (16, 64)
) -> list[Request]:
    """n requests, the same for the same arguments: word counts and max_tokens uniform over their ranges."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _check_range("prompt_words", prompt_words)
    _check_range("max_tokens", max_tokens)
    rng = random.Random(seed)
    requests = []
    for index in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words)))
        requests.append(Request(index=index, prompt=prompt, max_tokens=rng.randint(*max_tokens)))
    return requests


def _check_range(name: str, value: tuple[int, int]) -> None:
    ok = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 1 <= value[0] <= value[1]:
        raise ValueError(f"{name} must be (lo, hi) integers with 1 <= lo <= hi, got {value!r}")


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


# --- report ---------------------------------------------------------------------------------------------------
COLUMNS = ("system", "concurrency", "requests", "errors", "output tok/s", "TTFT p50 ms", "TTFT p95 ms",
           "TTFT p99 ms", "ITL p50 ms", "ITL p95 ms", "ITL p99 ms")
_KEYS = ("output_tok_per_s", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p95_ms", "itl_p99_ms")


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * (len(COLUMNS) - 1)


def table_row(system: str, summary: Mapping[str, Any]) -> str:
    """One markdown row of `LoadResult.summary()` (missing or None values print as '-')."""
    cells = [system, str(summary.get("concurrency", "-")), str(summary.get("requests", "-")),
             str(summary.get("errors", "-"))]
    cells += ["-" if summary.get(key) is None else f"{summary[key]:.1f}" for key in _KEYS]
    return "| " + " | ".join(cells) + " |"


def plot(
    results_by_system: Mapping[str, Mapping[int, LoadResult]],
    path: str | Path,
    *,
    ceilings: Mapping[str, float] | None = None,
) -> Path:
    """PNG of output tok/s and p50/p95 TTFT against concurrency, one line per system; `ceilings` (tok/s)
    are drawn as horizontal lines on the throughput panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    throughput, ttft = fig.subplots(1, 2)
    levels: set[int] = set()
    for i, (system, by_level) in enumerate(results_by_system.items()):
        xs = sorted(by_level)
        levels.update(xs)
        summaries = [by_level[c].summary() for c in xs]
        throughput.plot(xs, [s["output_tok_per_s"] for s in summaries], marker="o", color=f"C{i}", label=system)
        for q, style in ((50, "-"), (95, "--")):
            values = [math.nan if s[f"ttft_p{q}_ms"] is None else s[f"ttft_p{q}_ms"] for s in summaries]
            ttft.plot(xs, values, marker="o", linestyle=style, color=f"C{i}", label=f"{system} p{q}")
    for j, (name, value) in enumerate((ceilings or {}).items()):
        throughput.axhline(value, linestyle=":", color=f"C{len(results_by_system) + j}", label=name)
    for ax, title, unit in ((throughput, "Output throughput", "output tokens / s"), (ttft, "Time to first token",
                                                                                      "TTFT ms (log)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(levels), [str(c) for c in sorted(levels)])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ttft.set_yscale("log")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# --- command line ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """`herd bench`: one run per concurrency level, a markdown row as each ends. Level i uses seed + i, so
    no level reuses another's prompts (a server's prefix cache would otherwise flatter later levels)."""
    args = _parser().parse_args(argv)
    try:
        extra = json.loads(args.extra_body) if args.extra_body else None
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"--extra-body must be a JSON object, got {args.extra_body!r}")
        results: dict[int, LoadResult] = {}
        print(table_header(), flush=True)
        for i, concurrency in enumerate(args.concurrency):
            workload = make_workload(args.requests, seed=args.seed + i, prompt_words=tuple(args.prompt_words),
                                     max_tokens=tuple(args.max_tokens))
            result = asyncio.run(run_load(args.url, args.model, workload, concurrency=concurrency,
                                          endpoint=args.endpoint, api_key=args.api_key, timeout_s=args.timeout_s,
                                          extra_body=extra))
            results[concurrency] = result
            print(table_row(args.label or args.model, result.summary()), flush=True)
        for result in results.values():
            for line in result.errors()[:5]:
                print(f"concurrency {result.concurrency}: {line}", file=sys.stderr)
        if args.plot:
            print(f"plot: {plot({args.label or args.model: results}, args.plot)}")
    except ValueError as err:
        print(f"herd bench: error: {err}", file=sys.stderr)
        return 2
    return 1 if any(r.summary()["errors"] == len(r.records) for r in results.values()) else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="herd bench", description="Load an OpenAI-compatible server; report "
                                "output tok/s, TTFT and inter-token latency per concurrency.")
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000 (or its /v1)")
    p.add_argument("--model", required=True, help="the `model` field of every request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients, per run")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--seed", type=int, default=0, help="workload seed (level i uses seed + i)")
    p.add_argument("--prompt-words", type=int, nargs=2, default=[8, 128], metavar=("LO", "HI"))
    p.add_argument("--max-tokens", type=int, nargs=2, default=[16, 64], metavar=("LO", "HI"))
    p.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--timeout-s", type=float, default=300.0, help="connect and per-read timeout")
    p.add_argument("--extra-body", help='JSON merged into every request, e.g. \'{"ignore_eos": true}\'')
    p.add_argument("--label", help="system name in the table and plot (default: the model)")
    p.add_argument("--plot", type=Path, help="write a PNG of throughput and TTFT against concurrency")
    return p
