"""Soak: `herd serve` on the tiny Scout (2 gRPC expert shards) under steady load with overload bursts for a
bounded time, sampling memory and KV use. Passes when the RSS of every Herd process and the KV blocks held
are flat (the last window against the first) and no request fails other than with 429.

Load: `--concurrency` clients in a loop (mixed prompt and output lengths from a fixed seed; after a 429
a client waits its Retry-After), and every `--burst-every-s` seconds a burst of `--burst` more at once,
beyond the replica's queue, which Serve refuses with 429. Every `--sample-s` seconds: RSS of the gateway
(the herd serve process), of the replica, of each expert shard (by process title, under herd serve), and
the KV blocks the replica holds (/herd/stats); requests by outcome. The baseline is the run's own first
window: "flat" means the median of the last window is within `--rss-tolerance` of the first's (and KV
returns to 0 when idle). API keys are on, as users run it: every request carries the key of a tenant made
at start (bench.common.HerdServe), so the tenancy guard and the usage ledger are under the same load.

`--smoke` runs a few seconds at a handful of clients: it still fails on a request that failed other than with
429 and on KV held when idle, but does not judge memory, which has no time to settle.

    .venv/bin/python bench/soak.py [--duration-s 600] [--concurrency 16] [--burst 48] [--burst-every-s 30] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import HerdServe, ServerError, parse_args_with_smoke, tiny_checkpoint
from herd_loadgen import make_workload


async def _sample(http: Any, roles: dict[str, int], outcomes: Any, *, t_s: int) -> dict[str, Any]:
    """One row of the soak's table: memory of each process, KV blocks and requests held, outcomes so far."""
    stats = (await http.get("/herd/stats")).json()["scout"]
    return {"t_s": t_s, **{f"{role}_mib": round(_rss_mib(pid), 1) for role, pid in roles.items()},
            "kv_blocks": stats["kv_blocks_held"], "in_flight": stats["in_flight"], **dict(outcomes)}


def _rss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def _herd_processes(root: int) -> dict[str, int]:
    """{role: pid}: the gateway (herd serve itself), the replica, each expert shard."""
    roles = {"gateway": root}
    shards = 0
    for child in sorted(psutil.Process(root).children(recursive=True), key=lambda p: p.pid):
        pid, title = child.pid, " ".join(child.cmdline())
        if title.startswith("ray::ServeReplica:scout"):
            roles["replica"] = pid
        elif title.startswith("ray::ExpertShardActor"):
            roles[f"shard{shards}"] = pid
            shards += 1
    return roles


async def _client(http: httpx.AsyncClient, workload, stop: float, outcomes: Counter) -> None:
    i = 0
    while time.monotonic() < stop:
        request = workload[i % len(workload)]
        i += 1
        retry_after_s = await _one(http, request, outcomes)
        if retry_after_s:  # a well-behaved client waits as told before its next request
            await asyncio.sleep(retry_after_s)


async def _one(http: httpx.AsyncClient, request, outcomes: Counter) -> float:
    """Send one request, count its outcome; the Retry-After of a 429 (else 0)."""
    body = {"model": "scout", "messages": [{"role": "user", "content": request.prompt}],
            "max_tokens": request.max_tokens, "temperature": 0, "ignore_eos": True}
    try:
        reply = await http.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as err:
        outcomes[type(err).__name__] += 1
        return 0.0
    outcomes[str(reply.status_code)] += 1
    return float(reply.headers.get("retry-after", 1)) if reply.status_code == 429 else 0.0


async def _soak(url: str, api_key: str, args: argparse.Namespace, roles: dict[str, int]) -> list[dict[str, Any]]:
    workload = make_workload(256, seed=args.seed, prompt_words=(8, 96), max_tokens=(8, 48))
    bursts = make_workload(args.burst, seed=args.seed + 1, prompt_words=(8, 32), max_tokens=(8, 16))
    outcomes: Counter = Counter()
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    stop = start + args.duration_s
    limits = httpx.Limits(max_connections=args.concurrency + args.burst)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=headers) as http:
        clients = [asyncio.create_task(_client(http, workload[i::args.concurrency], stop, outcomes))
                   for i in range(args.concurrency)]
        next_burst, next_sample = start + args.burst_every_s, start
        burst_tasks = []
        while time.monotonic() < stop:
            now = time.monotonic()
            if now >= next_burst:
                burst_tasks.append(asyncio.ensure_future(asyncio.gather(*[_one(http, r, outcomes) for r in bursts])))
                next_burst += args.burst_every_s
            if now >= next_sample:
                samples.append(await _sample(http, roles, outcomes, t_s=round(now - start)))
                next_sample += args.sample_s
            await asyncio.sleep(0.2)
        await asyncio.gather(*clients, *burst_tasks)
        await asyncio.sleep(2)
        samples.append({**await _sample(http, roles, outcomes, t_s=round(time.monotonic() - start)), "idle": True})
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--burst", type=int, default=48)
    parser.add_argument("--burst-every-s", type=float, default=30)
    parser.add_argument("--sample-s", type=float, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed growth of a window median")
    args = parse_args_with_smoke(parser, argv, duration_s=4, concurrency=2, burst=4, burst_every_s=2, sample_s=1)
    work = Path(tempfile.mkdtemp(prefix="herd-soak-"))
    model = tiny_checkpoint(work / "scout", seed=3)
    settings = {"models": [{"name": "scout", "path": str(model), "shards": 2, "transport": "grpc",
                            "deployment": {"max_ongoing_requests": 32, "max_queued_requests": 16},
                            "engine": {"max_num_seqs": 32}}]}
    try:
        with HerdServe(work, settings=settings) as server:
            assert server.proc is not None
            roles = _herd_processes(server.proc.pid)
            samples = asyncio.run(_soak(server.url, server.api_key, args, roles))
    except ServerError as err:
        print(f"herd serve did not start: {err}", file=sys.stderr)
        return 1
    return _report(samples, roles, args)


def _report(samples: list[dict[str, Any]], roles: dict[str, int], args: argparse.Namespace) -> int:
    columns = ["t_s", *[f"{r}_mib" for r in roles], "kv_blocks", "in_flight", "200", "429"]
    print("| " + " | ".join(columns) + " | other |")
    print("|" + "---|" * (len(columns) + 1))
    for s in samples:
        other = sum(v for k, v in s.items() if k.isdigit() and k not in ("200", "429")) + sum(
            v for k, v in s.items() if k.endswith(("Error", "Timeout")))
        print("| " + " | ".join(str(s.get(c, 0)) for c in columns) + f" | {other} |")
    loaded = [s for s in samples if not s.get("idle")]
    window = max(1, len(loaded) // 4)
    ok = True
    for role in roles:
        first = statistics.median(s[f"{role}_mib"] for s in loaded[1 : 1 + window] or loaded)  # after warm-up
        last = statistics.median(s[f"{role}_mib"] for s in loaded[-window:])
        flat = last <= first * (1 + args.rss_tolerance)
        ok &= flat or args.smoke
        verdict = "not judged (--smoke)" if args.smoke else "flat" if flat else "GREW"
        print(f"{role}: RSS median {first:.0f} -> {last:.0f} MiB ({last / first:.3f}x) {verdict}")
    final = samples[-1]
    others = {k: v for k, v in final.items() if (k.isdigit() and k not in ("200", "429")) or k.endswith("Error")}
    print(f"requests: {final.get('200', 0)} ok, {final.get('429', 0)} refused (429), other: {others or 0}")
    print(f"idle: KV blocks held {final['kv_blocks']}, in flight {final['in_flight']}")
    ok &= not others and final["kv_blocks"] == 0 and final["in_flight"] == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
