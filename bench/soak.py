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

Faults (issue 17): tenants and usage live in a fresh PostgreSQL database and the limits in Redis (the tenant
has a request rate and a concurrency limit, so both are used on every request); `--slow-readers` clients open a
big streamed answer, read its first event and then stop reading, so the door's write deadline must end the
request; `--restart-redis-at-s` and `--restart-postgres-at-s` restart the machine's Redis and PostgreSQL while
the load runs. At the end, after herd serve has stopped, every request a client saw admitted (a 200, or a
stream's first event) must have exactly one usage row: "lost rows" must be 0. Refusals while a service was
down (401/429/503) are counted, and have no row.

`--smoke` runs a few seconds at a handful of clients (no restarts): it still fails on a request that failed
other than with 429, on KV held when idle and on a lost usage row, but does not judge memory, which has no time
to settle.

    .venv/bin/python bench/soak.py [--duration-s 600] [--concurrency 16] [--burst 48] [--burst-every-s 30]
        [--slow-readers 1] [--restart-redis-at-s 200] [--restart-postgres-at-s 400] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.common from a checkout

from bench.common import HerdServe, ServerError, parse_args_with_smoke, tiny_checkpoint
from herd_loadgen import make_workload

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
WRITE_TIMEOUT_S = 5.0  # the doors' stream write deadline in this run: a slow reader is ended after it
IDLE_WITHIN_S = 60.0  # once the clients stop, the replica must hold no request and no KV block within this


@dataclass
class Seen:
    """What the clients saw: outcomes by status, and the request ids of everything admitted."""

    outcomes: Counter[str] = field(default_factory=Counter)
    admitted: set[str] = field(default_factory=set)
    unread: set[str] = field(default_factory=set)  # the slow readers' requests


async def _sample(ops: httpx.AsyncClient, roles: dict[str, int], seen: Seen, *, t_s: int) -> dict[str, Any]:
    """One row of the soak's table: memory of each process, KV blocks and requests held, outcomes so far."""
    stats = (await ops.get("/herd/stats")).json()["scout"]
    return {"t_s": t_s, **{f"{role}_mib": round(_rss_mib(pid), 1) for role, pid in roles.items()},
            "kv_blocks": stats["kv_blocks_held"], "in_flight": stats["in_flight"], **dict(seen.outcomes)}


def _rss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def _herd_processes(root: int) -> dict[str, int]:
    """{role: pid}: the gateway (herd serve itself), the replica, each expert shard, in that order whatever order
    the processes were started in (the table's columns follow it)."""
    replica: dict[str, int] = {}
    shards: list[int] = []
    for child in sorted(psutil.Process(root).children(recursive=True), key=lambda p: p.pid):
        pid, title = child.pid, " ".join(child.cmdline())
        if title.startswith("ray::ServeReplica:scout"):
            replica["replica"] = pid
        elif title.startswith("ray::ExpertShardActor"):
            shards.append(pid)
    return {"gateway": root, **replica, **{f"shard{i}": pid for i, pid in enumerate(shards)}}


async def _client(http: httpx.AsyncClient, workload: Any, stop: float, seen: Seen) -> None:
    i = 0
    while time.monotonic() < stop:
        request = workload[i % len(workload)]
        i += 1
        retry_after_s = await _one(http, request, seen)
        if retry_after_s:  # a well-behaved client waits as told before its next request
            await asyncio.sleep(retry_after_s)


async def _one(http: httpx.AsyncClient, request: Any, seen: Seen) -> float:
    """Send one request, count its outcome; the Retry-After of a refusal (else 0)."""
    body = {"model": "scout", "messages": [{"role": "user", "content": request.prompt}],
            "max_tokens": request.max_tokens, "temperature": 0, "ignore_eos": True}
    try:
        reply = await http.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as err:
        seen.outcomes[type(err).__name__] += 1
        return 1.0
    seen.outcomes[str(reply.status_code)] += 1
    if reply.status_code == 200:
        seen.admitted.add(reply.json()["id"].removeprefix("chatcmpl-"))
    return float(reply.headers.get("retry-after", 1)) if reply.status_code in (429, 503) else 0.0


async def _slow_reader(port: int, api_key: str, stop: float, seen: Seen) -> None:
    """A client that asks for a big streamed answer, reads its first event, then stops reading (its socket's
    receive buffer kept small) until well past the write deadline; then it hangs up and tries again."""
    body = json.dumps({"model": "scout", "messages": [{"role": "user", "content": "Tell me everything."}],
                       "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": True,
                       "top_logprobs": 20}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api_key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    while time.monotonic() < stop:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
        except OSError as err:
            sock.close()
            seen.outcomes[f"slow reader {type(err).__name__}"] += 1
            await asyncio.sleep(1)
            continue
        writer.write(request)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            status = head.split(b" ", 2)[1].decode()
            if status == "200":
                size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 60)).strip(), 16)  # chunked
                event = await asyncio.wait_for(reader.readexactly(size), 60)
                chunk = json.loads(event.decode().strip().removeprefix("data: "))
                seen.admitted.add(chunk["id"].removeprefix("chatcmpl-"))
                seen.unread.add(chunk["id"].removeprefix("chatcmpl-"))
            seen.outcomes[f"slow reader {status}"] += 1
            await asyncio.sleep(WRITE_TIMEOUT_S * 3)  # reading nothing meanwhile
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, KeyError, OSError) as err:
            seen.outcomes[f"slow reader {type(err).__name__}"] += 1
        finally:
            writer.close()


def _restart(service: str) -> float:
    """Stop and start this machine's Redis or PostgreSQL; the seconds it was down."""
    start = time.monotonic()
    if service == "redis":
        subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False, capture_output=True)
        time.sleep(1)
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
                        "--appendonly", "no"], check=True, capture_output=True)
    else:
        version, cluster = subprocess.run(["pg_lsclusters", "-h"], check=True, capture_output=True,
                                          text=True).stdout.split()[:2]
        subprocess.run(["pg_ctlcluster", version, cluster, "restart"], check=True, capture_output=True)
    return time.monotonic() - start


async def _soak(server: HerdServe, args: argparse.Namespace, roles: dict[str, int]) -> tuple[list[dict[str, Any]],
                                                                                               Seen]:
    workload = make_workload(256, seed=args.seed, prompt_words=(8, 96), max_tokens=(8, 48))
    bursts = make_workload(args.burst, seed=args.seed + 1, prompt_words=(8, 32), max_tokens=(8, 16))
    seen = Seen()
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    stop = start + args.duration_s
    restarts = sorted((at, name) for at, name in ((args.restart_redis_at_s, "redis"),
                                                  (args.restart_postgres_at_s, "postgres")) if at is not None)
    limits = httpx.Limits(max_connections=args.concurrency + args.burst)
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits, headers=headers) as http, \
            httpx.AsyncClient(base_url=server.ops_url, timeout=30) as ops:
        clients = [asyncio.create_task(_client(http, workload[i::args.concurrency], stop, seen))
                   for i in range(args.concurrency)]
        clients += [asyncio.create_task(_slow_reader(server.http_port, server.api_key, stop, seen))
                    for _ in range(args.slow_readers)]
        next_burst, next_sample = start + args.burst_every_s, start
        burst_tasks = []
        while time.monotonic() < stop:
            now = time.monotonic()
            if restarts and now - start >= restarts[0][0]:
                name = restarts.pop(0)[1]
                down_s = await asyncio.to_thread(_restart, name)
                seen.outcomes[f"{name} restarted"] += 1
                print(f"t={now - start:.0f}s: restarted {name} ({down_s:.1f} s)", flush=True)
            if now >= next_burst:
                burst_tasks.append(asyncio.ensure_future(asyncio.gather(*[_one(http, r, seen) for r in bursts])))
                next_burst += args.burst_every_s
            if now >= next_sample:
                samples.append(await _sample(ops, roles, seen, t_s=round(now - start)))
                next_sample += args.sample_s
            await asyncio.sleep(0.2)
        await asyncio.gather(*clients, *burst_tasks)
        ended = time.monotonic()
        while True:  # idle: every request ends and frees its KV blocks (a slow reader's within the deadline)
            final = await _sample(ops, roles, seen, t_s=round(time.monotonic() - start))
            if (final["in_flight"] == 0 and final["kv_blocks"] == 0) or time.monotonic() - ended > IDLE_WITHIN_S:
                break
            await asyncio.sleep(1)
        samples.append({**final, "idle": True, "idle_after_s": round(time.monotonic() - ended, 1)})
    return samples, seen


def _usage_rows(database_url: str) -> dict[str, str]:
    """request id -> status of every usage row of the soak's tenant."""
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT request_id, status FROM usage WHERE tenant_id = :t"),
                                {"t": "bench"}).all()
    finally:
        engine.dispose()
    return {str(r[0]): str(r[1]) for r in rows}


def _database(name: str, *, create: bool) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            conn.execute(f'CREATE DATABASE "{name}"')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--burst", type=int, default=48)
    parser.add_argument("--burst-every-s", type=float, default=30)
    parser.add_argument("--sample-s", type=float, default=15)
    parser.add_argument("--slow-readers", type=int, default=1)
    parser.add_argument("--restart-redis-at-s", type=float, default=None)
    parser.add_argument("--restart-postgres-at-s", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed growth of a window median")
    args = parse_args_with_smoke(parser, argv, duration_s=6, concurrency=2, burst=4, burst_every_s=2, sample_s=1,
                                 restart_redis_at_s=None, restart_postgres_at_s=None)
    work = Path(tempfile.mkdtemp(prefix="herd-soak-"))
    model = tiny_checkpoint(work / "scout", seed=3)
    database = f"herd_soak_{os.getpid()}"
    database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    settings = {"models": [{"name": "scout", "path": str(model), "shards": 2, "transport": "grpc",
                            "deployment": {"max_ongoing_requests": 32, "max_queued_requests": 16},
                            "engine": {"max_num_seqs": 32}}],
                "tenancy": {"database_url": database_url, "redis_url": REDIS_URL},
                "limits": {"stream_write_timeout_s": WRITE_TIMEOUT_S}}
    tenant = {"requests_per_min": 1_000_000, "max_concurrent": 256}  # both checked on every request
    _database(database, create=True)
    try:
        with HerdServe(work, settings=settings, tenant=tenant) as server:
            assert server.proc is not None
            roles = _herd_processes(server.proc.pid)
            samples, seen = asyncio.run(_soak(server, args, roles))
        rows = _usage_rows(database_url)
    except ServerError as err:
        print(f"herd serve did not start: {err}", file=sys.stderr)
        return 1
    finally:
        _database(database, create=False)
        shutil.rmtree(work, ignore_errors=True)
    return _report(samples, seen, rows, roles, args)


def _report(samples: list[dict[str, Any]], seen: Seen, rows: dict[str, str], roles: dict[str, int],
            args: argparse.Namespace) -> int:
    columns = ["t_s", *[f"{r}_mib" for r in roles], "kv_blocks", "in_flight", "200", "429", "503"]
    print("| " + " | ".join(columns) + " | other |")
    print("|" + "---|" * (len(columns) + 1))
    for s in samples:
        other = sum(v for k, v in s.items() if k.isdigit() and k not in columns) + sum(
            v for k, v in s.items() if k.endswith(("Error", "Timeout")) and not k.startswith("slow reader"))
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
    restarted = args.restart_redis_at_s is not None or args.restart_postgres_at_s is not None
    expected = {"200", "429"} | ({"401", "503", "ConnectError", "ReadError", "RemoteProtocolError"} if restarted
                                 else set())
    others = {k: v for k, v in seen.outcomes.items()
              if not k.startswith("slow reader") and not k.endswith("restarted") and k not in expected}
    print(f"requests: {dict(sorted(seen.outcomes.items()))}")
    print(f"idle: KV blocks held {final['kv_blocks']}, in flight {final['in_flight']}, "
          f"{final['idle_after_s']} s after the clients stopped")
    lost = seen.admitted - rows.keys()
    extra = Counter(status for rid, status in rows.items() if rid not in seen.admitted)
    print(f"ledger: {len(seen.admitted)} requests admitted as the clients saw them, {len(rows)} usage rows; "
          f"lost rows {len(lost)}; rows of requests the clients did not see answered, by status: {dict(extra)}")
    if args.slow_readers:
        ended = Counter(rows.get(rid, "(none)") for rid in seen.unread)
        print(f"slow readers: {len(seen.unread)} streams opened and left unread; their rows by status: {dict(ended)}")
    ok &= not others and not lost and final["kv_blocks"] == 0 and final["in_flight"] == 0
    ok &= bool(seen.unread) or not args.slow_readers
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
