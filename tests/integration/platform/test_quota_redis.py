"""Tenant quotas on a real Redis: two guards ("two gateways") sharing one Redis together hold only
max_concurrent slots and one monthly budget counting what their requests in flight reserved; a crashed
gateway's slots expire with their lease. Every test works under its own key prefix and deletes it afterwards
(the fixtures of test_rate_limit_redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from herd.engine.errors import HerdError
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.quota import Caps, RedisQuota
from herd.platform.tenancy.rate_limit import RedisRateLimiter
from herd.platform.tenancy.store import Identity, TenantStore
from tests.integration.platform.test_rate_limit_redis import prefix, redis_url

__all__ = ["prefix", "redis_url"]  # the fixtures, used by name


@pytest.fixture
def store(tmp_path: Path) -> TenantStore:
    engine = connect(f"sqlite:///{tmp_path / 'herd.db'}")
    migrate(engine)
    return TenantStore(engine)


@asynccontextmanager
async def gateways(url: str, key_prefix: str, store: TenantStore, count: int = 2,
                   **guard_args: Any) -> AsyncIterator[list[Guard]]:
    """`count` guards, each with its own Redis client, as separate gateway processes would have."""
    clients = [redis.asyncio.Redis.from_url(url) for _ in range(count)]
    try:
        yield [Guard(store, RedisRateLimiter(c, prefix=key_prefix + "rl:"), UsageLedger(store),
                     quota=RedisQuota(c, lease_s=600, prefix=key_prefix + "q:"), **guard_args) for c in clients]
    finally:
        for client in clients:
            await client.aclose()


def tenant(store: TenantStore, **limits: Any) -> Identity:
    store.create_tenant("acme", **limits)
    return Identity(tenant=store.get_tenant("acme"), key_id="k1")


async def refusal(call: Awaitable[object]) -> str | None:
    with pytest.raises(HerdError) as info:
        await call
    return info.value.reason


def test_two_gateways_together_admit_only_max_concurrent(redis_url: str, prefix: str, store: TenantStore) -> None:
    who = tenant(store, max_concurrent=3)

    async def main() -> None:
        async with gateways(redis_url, prefix, store) as (one, two):
            held = [await one.enter(who, "llama", "a"), await two.enter(who, "llama", "b"),
                    await one.enter(who, "llama", "c")]
            assert await refusal(two.enter(who, "llama", "d")) == "max_concurrent"
            assert await refusal(one.enter(who, "llama", "d")) == "max_concurrent"
            assert all(a.limits is not g.fallback for a, g in zip(held, (one, two, one), strict=True))
            await one.settle(held[1], completion_tokens=0, cached_tokens=0, status="cancelled")  # two's, freed by one
            entered = await two.enter(who, "llama", "d")
            assert await refusal(one.enter(who, "llama", "e")) == "max_concurrent"
            for admission in (held[0], held[2], entered):
                await two.settle(admission, completion_tokens=0, cached_tokens=0, status="cancelled")
            assert len([await one.enter(who, "llama", f"f{n}") for n in range(3)]) == 3

    asyncio.run(main())


def test_the_budget_is_shared_and_counts_reservations_in_flight(redis_url: str, prefix: str,
                                                                store: TenantStore) -> None:
    store.create_tenant("acme", monthly_token_budget=1000)
    store.record_usage([{"time": _now(), "tenant_id": "acme", "key_id": "k1", "model": "llama",
                         "request_id": "earlier", "prompt_tokens": 300, "completion_tokens": 100,
                         "cached_tokens": 0, "status": "ok", "latency_ms": 1}])
    who = Identity(tenant=store.get_tenant("acme"), key_id="k1")

    async def main() -> None:
        async with gateways(redis_url, prefix, store) as (one, two):
            first = await one.admit(who, "llama", "a", 100, 300)  # 400 used + 400 reserved
            assert await refusal(two.admit(who, "llama", "b", 100, 150)) == "monthly_token_budget"  # 400 + 400 + 250
            second = await two.admit(who, "llama", "c", 100, 100)  # exactly 1000
            assert await refusal(one.enter(who, "llama", "d")) == "monthly_token_budget"  # nothing left to enter
            await one.settle(first, completion_tokens=50, cached_tokens=0, status="ok")  # used 150 of its 400
            third = await two.admit(who, "llama", "e", 50, 200)  # 550 used + 200 reserved + 250
            await two.settle(second, completion_tokens=100, cached_tokens=0, status="ok")
            await one.settle(third, completion_tokens=200, cached_tokens=0, status="ok")
            assert await refusal(two.enter(who, "llama", "f")) == "monthly_token_budget"  # 1000 used

    asyncio.run(main())


def test_a_chat_without_max_tokens_does_not_reserve_its_whole_context(redis_url: str, prefix: str,
                                                                      store: TenantStore) -> None:
    who = tenant(store, output_tokens_per_min=4000)

    async def main() -> None:
        async with gateways(redis_url, prefix, store, default_output_reservation_tokens=1024) as (one, two):
            admissions = []
            for n, guard in enumerate((one, two, one)):
                admission = await guard.enter(who, "llama", f"chat-{n}")
                await guard.reserve(admission, 20, 131_000, max_tokens_given=False)  # the room left in the context
                admissions.append(admission)
            last = await two.enter(who, "llama", "over")
            assert await refusal(two.reserve(last, 20, 1000)) == "output_tokens_per_min"  # 3072 + 1000 > 4000
            await two.settle(last, completion_tokens=0, cached_tokens=0, status="refused")
            for admission in admissions:
                await one.settle(admission, completion_tokens=24, cached_tokens=0, status="ok")
            fits = await two.admit(who, "llama", "fits", 20, 3900)  # 3 x 24 billed, the rest given back
            await two.settle(fits, completion_tokens=0, cached_tokens=0, status="ok")

    asyncio.run(main())


def test_a_crashed_gateways_slots_expire_with_their_lease(redis_url: str, prefix: str, store: TenantStore) -> None:
    who = tenant(store, max_concurrent=1, monthly_token_budget=1000)

    async def main() -> None:
        async with gateways(redis_url, prefix, store) as (crashed, alive):
            await crashed.admit(who, "llama", "lost", 100, 800)  # never settled: its gateway died
            assert await refusal(alive.enter(who, "llama", "a")) == "max_concurrent"
            quota = alive.limits.quota
            assert isinstance(quota, RedisQuota)
            slots, _, _ = quota.keys("acme", _now().strftime("%Y-%m"))
            client = redis.asyncio.Redis.from_url(redis_url)
            await client.zadd(slots, {"lost": 0})  # its lease ran out (scores are lease ends, in Redis seconds)
            await client.aclose()
            admission = await alive.admit(who, "llama", "a", 100, 800)  # slot and reservation both came back
            await alive.settle(admission, completion_tokens=0, cached_tokens=0, status="ok")

    asyncio.run(main())


def test_quota_keys_of_a_tenant_share_one_hash_slot(redis_url: str, prefix: str) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        quota = RedisQuota(client, lease_s=60, prefix=prefix)
        keys = quota.keys("acme", "2026-12")
        assert {k.split("{")[1].split("}")[0] for k in keys} == {"acme"}
        assert await quota.enter("acme", "r", "2026-12", Caps(1, None), _never_asked) is None
        assert await quota.enter("acme", "s", "2026-12", Caps(1, None), _never_asked) == "max_concurrent"
        await quota.release("acme", "r", "2026-12", 5)
        assert not await client.exists(keys[2]), "usage is counted only on top of the database's count"
        await client.aclose()

    asyncio.run(main())


async def _never_asked() -> int:
    raise AssertionError("a tenant without a budget never reads its usage")


def _now() -> datetime:
    return datetime.now(UTC)
