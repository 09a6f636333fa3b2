"""Multi-turn chat on 2 replicas: prefix-aware routing with a host KV tier against round-robin routing with the
device cache alone. TTFT and output tok/s on the tiny Scout (CPU, float32, greedy, ignore_eos), `herd serve` with
API keys on (bench.common.HerdServe), experts in the trunk (shards: 0).

The workload (seeded, the same for both systems): C conversations of T turns. A turn appends a user message of
U random words (about 3.2 tokens a word with the tiny tokenizer) to the conversation's history, sends the whole
history as a streamed chat completion (temperature 0, max_tokens M, ignore_eos) and appends the reply. Every
conversation runs at once, its turns in order, each turn after a seeded think time (uniform 0 to 2x --think-s,
so the conversations interleave in no fixed order); at most --concurrency requests are in flight, the rest wait
their turn (first come, first served). TTFT is a turn's time to its first content chunk; output tok/s is every
reply's completion tokens over the run's wall time. Turn 1 has no history to reuse, so TTFT is reported for turns
>= 2 and for all.

Sizes (defaults). One replica computes a 2000-token prefill in about 0.18 s and 4000 in about 0.45 s (the engine
alone, one core), a decode step of one sequence in about 2.5 ms: at C=24, T=8, U=120 words, M=32 the last turn
sends about 3,500-3,750 tokens, so prefill dominates TTFT. max_model_len is 4096 (it holds the last turn). The KV
cache is 10 MiB per replica in both systems: the attention-chunked layers' pool takes 48 blocks (1.1 MiB, enough
for max_num_seqs 8; the tiny model's attention chunk is one 16-token block, so a prefix hit needs no chunked
block at all), the full-attention layer's pool the rest, 1136 blocks = 18,176 tokens: the 4 requests in flight at
their longest (15,000 tokens) even when all are on one replica, so no request waits for blocks, and otherwise a few
histories more, where 24 conversations end at about 90,000 tokens (12 of them, 45,000, on each replica when
routing keeps a conversation on one). The host tier (herd) is 8x that, 80 MiB: 145,408 tokens of full-attention
blocks per replica (and 9 MiB of chunked blocks: the tier splits its bytes as the device pool does), so every
history stays cached there.

Systems, one after the other, each its own `herd serve`; only the settings differ:
- baseline: deployment.request_router --baseline-router (round_robin), engine.host_kv_cache_mb 0.
- herd: deployment.request_router --herd-router (prefix), engine.host_kv_cache_mb --host-kv-cache-mb.
Both: 2 replicas, prefix caching on, the same kv_cache_mb. Each replica's prefix-cache and host-tier counters are
read from its Prometheus /metrics before and after the run (see replica_metrics_urls for how they are found).
The engine counts a lookup at every admission attempt, and a request that finds no room is admitted again at the
next step, so "prompt tokens looked up" can exceed the prompt tokens the clients sent (from the usage they got),
and the hit rate (hits / looked up) is per attempt.

Target (issue 25): herd's TTFT p50 (turns >= 2) <= 0.5x the baseline's. Exits 1 when a request failed or a
server did not come up, so a broken benchmark fails its --smoke run.

    .venv/bin/python bench/multiturn.py [--conversations 24] [--turns 8] [--user-words 120] [--max-tokens 32]
        [--concurrency 4] [--think-s 0.5] [--kv-cache-mb 10] [--host-kv-cache-mb 80] [--max-model-len 4096]
        [--seed 0]
        [--baseline-router round_robin] [--herd-router prefix] [--checkpoint DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import ROOT, HerdServe, ServerError, parse_args_with_smoke, percentile, print_command, tiny_checkpoint
from herd_loadgen import WORDS

MODEL = "scout"
ROUTERS = ("prefix", "power_of_two", "round_robin")
TARGET_RATIO = 0.5
COUNTERS = {  # a replica's counters this reads, by the name the tables use
    "requests": "herd_replica_prefill_seconds_count",
    "queue_s": "herd_replica_queue_seconds_sum",  # arrival at the engine to first scheduled
    "prefill_s": "herd_replica_prefill_seconds_sum",  # first scheduled to first token
    "queried": "herd_replica_prefix_cache_queries_tokens_total",
    "hits": "herd_replica_prefix_cache_hits_tokens_total",
    "host_hits": "herd_replica_host_kv_hits_tokens_total",
    "preemptions": "herd_replica_preemptions_total",
}


@dataclass(frozen=True, kw_only=True)
class System:
    """One system under test: a router and a host tier; everything else is shared."""

    name: str
    router: str
    host_kv_cache_mb: float


@dataclass(kw_only=True)
class TurnRecord:
    """What one turn did, on the client's clock."""

    conversation: int
    turn: int
    """1-based: turn 1 sends no history."""
    ttft_s: float | None = None
    """Send to the first non-empty content chunk; None if none came."""
    prompt_tokens: int = 0
    output_tokens: int = 0
    """From the usage of the stream's last chunk."""
    error: str | None = None


@dataclass(kw_only=True)
class SystemResult:
    system: System
    turns: list[TurnRecord]
    wall_s: float
    replicas: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per replica (its metrics URL): each COUNTERS entry's growth over the run."""
    note: str = ""


# --- the workload (pure) ------------------------------------------------------------------------------------------
def user_messages(conversations: int, turns: int, words: int, *, seed: int) -> list[list[str]]:
    """[conversation][turn] user message: `words` random words each, the same for the same arguments."""
    rng = random.Random(seed)
    return [[" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(turns)] for _ in range(conversations)]


def think_times(conversations: int, turns: int, mean_s: float, *, seed: int) -> list[list[float]]:
    """[conversation][turn] seconds a user waits before sending the turn (uniform over [0, 2 * mean_s])."""
    rng = random.Random(seed + 1)
    return [[rng.uniform(0, 2 * mean_s) for _ in range(turns)] for _ in range(conversations)]


def serve_settings(checkpoint: Path, system: System, args: argparse.Namespace) -> dict[str, Any]:
    """The settings file of `herd serve` for one system: only the router and the host tier are the system's."""
    engine = {"kv_cache_mb": args.kv_cache_mb, "host_kv_cache_mb": system.host_kv_cache_mb,
              "enable_prefix_caching": True, "block_size": 16, "max_num_seqs": 8, "max_model_len": args.max_model_len}
    return {"models": [{"name": MODEL, "path": str(checkpoint), "shards": 0,
                        "deployment": {"num_replicas": 2, "request_router": system.router}, "engine": engine}]}


# --- the client -----------------------------------------------------------------------------------------------------
async def one_turn(client: openai.AsyncOpenAI, history: list[ChatCompletionMessageParam], record: TurnRecord,
                   max_tokens: int) -> str:
    """Send the history, fill `record`, return the reply's text."""
    parts: list[str] = []
    sent = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=history, stream=True, temperature=0, max_tokens=max_tokens,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                record.prompt_tokens, record.output_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    if record.ttft_s is None:
                        record.ttft_s = time.perf_counter() - sent
                    parts.append(choice.delta.content)
        if not record.output_tokens:
            record.error = "the stream ended without usage"
    except openai.OpenAIError as err:
        record.error = f"{type(err).__name__}: {err}"[:300]
    return "".join(parts)


async def run_conversations(url: str, api_key: str, messages: list[list[str]], thinks: list[list[float]], *,
                            concurrency: int, max_tokens: int, timeout_s: float) -> tuple[list[TurnRecord], float]:
    """Every conversation at once, at most `concurrency` requests in flight; the turns' records and the wall time.
    A conversation whose turn failed stops there (its history has no reply to go on from)."""
    gate = asyncio.Semaphore(concurrency)
    records: list[TurnRecord] = []
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=timeout_s, max_retries=0) as client:

        async def conversation(index: int) -> None:
            history: list[ChatCompletionMessageParam] = []
            for turn, text in enumerate(messages[index]):
                await asyncio.sleep(thinks[index][turn])
                history.append({"role": "user", "content": text})
                record = TurnRecord(conversation=index, turn=turn + 1)
                records.append(record)
                async with gate:
                    reply = await one_turn(client, history, record, max_tokens)
                if record.error:
                    return
                history.append({"role": "assistant", "content": reply})

        start = time.perf_counter()
        await asyncio.gather(*(conversation(i) for i in range(len(messages))))
        return records, time.perf_counter() - start


# --- the replicas' counters -----------------------------------------------------------------------------------------
def replica_metrics_urls(server: HerdServe, replicas: int, *, tries: int = 20) -> list[str]:
    """Each replica's /metrics. /herd/stats names the metrics port of the one replica that answers it, and a router
    may send every such call to the same one (prefix routing sends them to the shortest queue: at rest, a tie), so
    the ports that herd serve's replica processes (Ray workers titled ray::ServeReplica, its descendants) listen on
    are tried too: those whose /metrics has herd_replica_ series are replicas'."""
    ports: set[int] = set()
    for _ in range(tries):
        stats = httpx.get(f"{server.ops_url}/herd/stats", timeout=30).json().get(MODEL, {})
        if "metrics_port" in stats:
            ports.add(int(stats["metrics_port"]))
        if len(ports) >= replicas:
            return [f"http://127.0.0.1:{port}/metrics" for port in sorted(ports)]
    assert server.proc is not None
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "ServeReplica" in " ".join(proc.cmdline()):
                ports |= {c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # it ended meanwhile, or is not ours to read
            continue
    return [url for url in (f"http://127.0.0.1:{port}/metrics" for port in sorted(ports)) if _exports_replica(url)]


def _exports_replica(url: str) -> bool:
    try:
        return COUNTERS["queried"].removesuffix("_total") in httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return False


def read_counters(urls: Sequence[str]) -> dict[str, dict[str, float]]:
    """COUNTERS of each replica now (0 for one it does not export)."""
    wanted = {name: key for key, name in COUNTERS.items()}
    counters = {}
    for url in urls:
        values = dict.fromkeys(COUNTERS, 0.0)
        for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
            for sample in family.samples:
                if sample.name in wanted and sample.labels.get("model") == MODEL:
                    values[wanted[sample.name]] = sample.value
        counters[url] = values
    return counters


def growth(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {url: {k: v - before[url][k] for k, v in values.items()} for url, values in after.items()}


# --- one system -----------------------------------------------------------------------------------------------------
def run_system(system: System, checkpoint: Path, messages: list[list[str]], thinks: list[list[float]],
               args: argparse.Namespace, work: Path) -> SystemResult:
    settings = serve_settings(checkpoint, system, args)
    with HerdServe(work / system.name, settings=settings, log=args.log_dir / f"{system.name}.log",
                   ready_timeout_s=args.ready_timeout_s) as server:
        warm = user_messages(4, 1, 8, seed=args.seed + 1000)  # a replica's first requests are slow; uncounted
        asyncio.run(run_conversations(server.url, server.api_key, warm, [[0.0]] * len(warm), concurrency=4,
                                      max_tokens=4, timeout_s=args.timeout_s))
        urls = replica_metrics_urls(server, 2)
        before = read_counters(urls)
        turns, wall_s = asyncio.run(run_conversations(server.url, server.api_key, messages, thinks,
                                                      concurrency=args.concurrency, max_tokens=args.max_tokens,
                                                      timeout_s=args.timeout_s))
        result = SystemResult(system=system, turns=turns, wall_s=wall_s,
                              replicas=growth(before, read_counters(urls)))
        if len(urls) < 2:
            result.note = f"{system.name}: found the /metrics of {len(urls)} of 2 replicas"
    return result


# --- the report (pure) ----------------------------------------------------------------------------------------------
def summary(result: SystemResult) -> dict[str, Any]:
    ok = [t for t in result.turns if t.error is None]
    later = [t.ttft_s for t in ok if t.turn >= 2 and t.ttft_s is not None]
    every = [t.ttft_s for t in ok if t.ttft_s is not None]
    totals = {k: sum(r[k] for r in result.replicas.values()) for k in COUNTERS}
    return {"turns": len(result.turns), "errors": len(result.turns) - len(ok),
            "p50_later": percentile(later, 50), "p95_later": percentile(later, 95),
            "p50_all": percentile(every, 50), "p95_all": percentile(every, 95),
            "tok_s": sum(t.output_tokens for t in ok) / result.wall_s if result.wall_s else 0.0,
            "max_prompt": max((t.prompt_tokens for t in ok), default=0),
            "prompt_sent": sum(t.prompt_tokens for t in ok), "queried": totals["queried"],
            "hit_rate": totals["hits"] / totals["queried"] if totals["queried"] else None,
            "host_hits": totals["host_hits"]}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def system_table(results: Sequence[SystemResult]) -> list[str]:
    lines = ["| system | router | host KV MiB | turns | errors | TTFT p50 ms (turns >= 2) | TTFT p95 ms (turns >= 2) "
             "| TTFT p50 ms (all) | TTFT p95 ms (all) | output tok/s | longest prompt | prompt tokens sent | "
             "prompt tokens looked up | prefix hit rate | host-tier hit tokens |", "|" + "---|" * 15]
    for r in results:
        s = summary(r)
        lines.append(f"| {r.system.name} | {r.system.router} | {r.system.host_kv_cache_mb:g} | {s['turns']} | "
                     f"{s['errors']} | {_ms(s['p50_later'])} | {_ms(s['p95_later'])} | {_ms(s['p50_all'])} | "
                     f"{_ms(s['p95_all'])} | {s['tok_s']:.1f} | {s['max_prompt']} | {s['prompt_sent']} | "
                     f"{s['queried']:.0f} | {_rate(s['hit_rate'])} | "
                     f"{s['host_hits']:.0f} |")
    return lines


def replica_table(results: Sequence[SystemResult]) -> list[str]:
    lines = ["| system | replica | requests | engine queue ms (mean) | engine prefill ms (mean) | "
             "prompt tokens looked up | prefix hit rate | host-tier hit tokens | preemptions |", "|" + "---|" * 9]
    for r in results:
        for i, counts in enumerate(r.replicas.values()):
            rate = counts["hits"] / counts["queried"] if counts["queried"] else None
            n = counts["requests"]
            queue, prefill = (counts["queue_s"] / n, counts["prefill_s"] / n) if n else (None, None)
            lines.append(f"| {r.system.name} | {i} | {n:.0f} | {_ms(queue)} | {_ms(prefill)} | "
                         f"{counts['queried']:.0f} | {_rate(rate)} | {counts['host_hits']:.0f} | "
                         f"{counts['preemptions']:.0f} |")
    return lines


def target_line(baseline: SystemResult, herd: SystemResult) -> str:
    b, h = summary(baseline)["p50_later"], summary(herd)["p50_later"]
    if not b or h is None:
        return f"- herd TTFT p50 (turns >= 2) <= {TARGET_RATIO}x baseline's: n/a (not both measured)"
    ratio = h / b
    return (f"- herd TTFT p50 (turns >= 2) <= {TARGET_RATIO}x baseline's: {h * 1e3:.0f} ms vs {b * 1e3:.0f} ms = "
            f"{ratio:.2f}x: {'PASS' if ratio <= TARGET_RATIO else 'FAIL'}")


# --- the command line -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=24)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--user-words", type=int, default=120, help="words of each user message")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens of each reply (ignore_eos)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at most, both replicas together")
    p.add_argument("--think-s", type=float, default=0.5, help="mean pause before each turn")
    p.add_argument("--kv-cache-mb", type=float, default=10, help="each replica's device KV cache, both systems")
    p.add_argument("--host-kv-cache-mb", type=float, default=80, help="each replica's host KV tier (herd only)")
    p.add_argument("--max-model-len", type=int, default=4096, help="the engines' context limit (the device KV cache "
                   "must hold one sequence of it)")
    p.add_argument("--baseline-router", choices=ROUTERS, default="round_robin")
    p.add_argument("--herd-router", choices=ROUTERS, default="prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=600.0, help="a request's connect and read timeout")
    p.add_argument("--ready-timeout-s", type=float, default=300.0, help="how long a server may take to come up")
    p.add_argument("--checkpoint", type=Path, default=ROOT / ".herd" / "tiny-scout",
                   help="checkpoint directory; made with make_tiny(preset='scout', seed=0) if it has no config.json")
    p.add_argument("--log-dir", type=Path, default=ROOT / ".herd" / "multiturn-bench-logs")
    return parse_args_with_smoke(p, argv, conversations=3, turns=2, user_words=8, max_tokens=4, concurrency=2,
                                 think_s=0.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_command("multiturn.py")
    checkpoint = tiny_checkpoint(args.checkpoint)
    messages = user_messages(args.conversations, args.turns, args.user_words, seed=args.seed)
    thinks = think_times(args.conversations, args.turns, args.think_s, seed=args.seed)
    systems = [System(name="baseline", router=args.baseline_router, host_kv_cache_mb=0),
               System(name="herd", router=args.herd_router, host_kv_cache_mb=args.host_kv_cache_mb)]
    results: list[SystemResult] = []
    failures: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for system in systems:
            load = os.getloadavg()[0]
            try:
                result = run_system(system, checkpoint, messages, thinks, args, Path(tmp))
            except ServerError as err:
                failures.append(f"{system.name}: herd serve did not come up: {err}")
                print(failures[-1], file=sys.stderr, flush=True)
                continue
            results.append(result)
            notes += [f"{system.name}: load average (1 min) {load:.2f} as it began, on {os.cpu_count()} CPUs; "
                      f"wall {result.wall_s:.1f} s"] + ([result.note] if result.note else [])
            errors = [t for t in result.turns if t.error]
            if errors:
                failures.append(f"{system.name}: {len(errors)} turns failed, the first: {errors[0].error}")

    print(f"\n## Multi-turn chat: tiny Scout ({checkpoint}), CPU float32, 2 replicas, {args.conversations} "
          f"conversations x {args.turns} turns, {args.user_words} words a user message, {args.max_tokens} tokens a "
          f"reply, concurrency {args.concurrency}, think time {args.think_s:g} s mean, device KV "
          f"{args.kv_cache_mb:g} MiB per replica, seed {args.seed}"
          f"{' (--smoke: sizes too small to mean anything)' if args.smoke else ''}\n")
    print("\n".join(system_table(results)))
    print()
    print("\n".join(replica_table(results)))
    print("\nTarget:")
    by_name = {r.system.name: r for r in results}
    print(target_line(by_name["baseline"], by_name["herd"]) if len(by_name) == 2 else
          f"- herd TTFT p50 (turns >= 2) <= {TARGET_RATIO}x baseline's: n/a (not both measured)")
    if args.baseline_router == args.herd_router:
        notes.append(f"both systems route with {args.herd_router}: the comparison shows the host tier alone")
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    if failures:
        print(f"\nFAILED (the servers' logs are in {args.log_dir}):\n" + "\n".join(f"- {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
