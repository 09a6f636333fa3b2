"""Rate limiting on a real Redis: the backend-independent suite, Redis's own clock and key expiry, and two
gateway processes sharing one limit. Every test works under its own key prefix and deletes it afterwards.
Without a Redis on 127.0.0.1:6379 these tests skip, except in CI (CI set), where they fail."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis
import redis.asyncio

from herd.platform.tenancy.rate_limit import Charge, Limit, RedisRateLimiter
from tests.unit.platform.tenancy.test_rate_limit import Body, RateLimiterContract, Runner

REDIS_URL = "redis://127.0.0.1:6379/0"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as err:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is required in CI: {err}")
        pytest.skip(f"no Redis at {REDIS_URL} ({err}); start one to run these tests")
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    value = f"herd:test:rl:{uuid.uuid4().hex}:"
    yield value
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=value + "*"))
    if keys:
        client.delete(*keys)
    client.close()


@asynccontextmanager
async def limiter_on(url: str, prefix: str) -> AsyncIterator[tuple[RedisRateLimiter, redis.asyncio.Redis]]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        yield RedisRateLimiter(client, prefix=prefix), client
    finally:
        await client.aclose()


class TestRedis(RateLimiterContract):
    @pytest.fixture
    def run(self, redis_url: str, prefix: str) -> Runner:
        def runner(body: Body) -> None:
            async def main() -> None:
                async with limiter_on(redis_url, prefix) as (limiter, _):
                    await body(limiter)

            asyncio.run(main())

        return runner


def test_uses_the_redis_clock_and_expires_idle_tenants(redis_url: str, prefix: str) -> None:
    two_a_minute = Limit("requests_per_min", 2)  # one unit per 30 s

    async def main() -> None:
        async with limiter_on(redis_url, prefix) as (limiter, client):
            assert (await limiter.acquire("t", [Charge(two_a_minute, 1)])).allowed
            assert (await limiter.acquire("t", [Charge(two_a_minute, 1)])).allowed
            refused = await limiter.acquire("t", [Charge(two_a_minute, 1)])
            # Only the milliseconds between the calls have passed on the server's clock.
            assert refused.limit_name == "requests_per_min"
            assert 29.0 < refused.retry_after_s <= 30.0
            ttl_ms = await client.pttl(limiter.bucket_key("t"))
            assert 59_000 < ttl_ms <= 61_000  # the TAT is 60 s ahead, plus a second's margin
            await limiter.refund("t", [Charge(two_a_minute, 2)])
            assert not await client.exists(limiter.bucket_key("t"))  # a full bucket is no key at all

    asyncio.run(main())


def test_a_refusal_writes_nothing(redis_url: str, prefix: str) -> None:
    tokens, requests = Limit("input_tokens_per_min", 100), Limit("requests_per_min", 60)

    async def main() -> None:
        async with limiter_on(redis_url, prefix) as (limiter, client):
            assert (await limiter.acquire("t", [Charge(tokens, 90)], now=1_000.0)).allowed
            key = limiter.bucket_key("t")
            fields, ttl_ms = await client.hgetall(key), await client.pttl(key)
            refused = await limiter.acquire("t", [Charge(requests, 1), Charge(tokens, 20)], now=1_000.0)
            assert refused.limit_name == "input_tokens_per_min"
            assert await client.hgetall(key) == fields
            assert b"requests_per_min" not in fields
            assert await client.pttl(key) <= ttl_ms  # not raised to cover the refused 66 s

    asyncio.run(main())


def test_reloads_the_script_after_a_script_flush(redis_url: str, prefix: str) -> None:
    requests = Limit("requests_per_min", 60)

    async def main() -> None:
        async with limiter_on(redis_url, prefix) as (limiter, client):
            assert (await limiter.acquire("t", [Charge(requests, 1)], now=1_000.0)).allowed
            await client.script_flush()  # as after a Redis restart or failover: EVALSHA answers NOSCRIPT
            assert (await limiter.acquire("t", [Charge(requests, 59)], now=1_000.0)).allowed
            assert not (await limiter.acquire("t", [Charge(requests, 1)], now=1_000.0)).allowed

    asyncio.run(main())


# One "gateway replica": connect and warm up, say ready, then at the agreed monotonic instant hammer
# acquire for the shared tenant until the deadline, and report admits and the span it was calling in.
WORKER = textwrap.dedent("""
    import asyncio, json, sys, time
    import redis.asyncio
    from herd.platform.tenancy.rate_limit import Charge, Limit, RedisRateLimiter

    async def main(url, prefix, per_minute, duration_s):
        client = redis.asyncio.Redis.from_url(url)
        limiter = RedisRateLimiter(client, prefix=prefix)
        charges = [Charge(Limit("requests_per_min", per_minute), 1)]
        await limiter.acquire("warm-up", charges)
        print("ready", flush=True)
        go_at = float(sys.stdin.readline())
        await asyncio.sleep(max(0.0, go_at - time.monotonic() - 0.01))
        while time.monotonic() < go_at:
            pass
        admitted = attempts = 0
        first = time.monotonic()
        while time.monotonic() < go_at + duration_s:
            admitted += (await limiter.acquire("tenant", charges)).allowed
            attempts += 1
        last = time.monotonic()
        await client.aclose()
        print(json.dumps({"admitted": admitted, "attempts": attempts, "first": first, "last": last}), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
""")


def test_two_gateway_processes_share_one_limit(redis_url: str, prefix: str) -> None:
    per_minute, duration_s = 600, 1.5  # a burst big enough for both to get a share; 10 a second refill
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, redis_url, prefix, str(per_minute), str(duration_s)],
                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.communicate(timeout=10)[1]
        go_at = time.monotonic() + 0.3
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{go_at}\n")
            p.stdin.flush()
        reports = [json.loads(p.communicate(timeout=30)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
    # CLOCK_MONOTONIC is one clock for every process on this machine, and it ticks with Redis's TIME.
    span_s = max(r["last"] for r in reports) - min(r["first"] for r in reports)
    refill = math.floor(span_s * per_minute / 60)
    total = sum(r["admitted"] for r in reports)
    assert per_minute <= total <= per_minute + refill, (total, refill, reports)
    assert all(r["admitted"] > 0 for r in reports), reports
    assert sum(r["attempts"] for r in reports) > 2 * total  # they really hammered past the limit
