"""The guard's admission path on SQLite, in process: enter / reserve / settle, refusals that hold nothing and
write nothing, reservations counted against the budget, and faults (a limiter or journal that raises, a
Redis or database that hangs) that never leak a slot or drop a row. Nothing sleeps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import redis.asyncio

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import http_status
from herd.platform.tenancy.guard import Admission, Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.quota import InProcessQuota, RedisQuota
from herd.platform.tenancy.rate_limit import Charge, Decision, InProcessRateLimiter, RedisRateLimiter
from herd.platform.tenancy.store import Identity, TenantStore

T = TypeVar("T")


def run(awaitable: Awaitable[T]) -> T:
    """Run one test body, bounded: a call that hangs fails the test instead of hanging it."""

    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, timeout=30)

    return asyncio.run(bounded())


def identity(store: TenantStore, tenant_id: str = "acme", **limits: Any) -> Identity:
    store.create_tenant(tenant_id, **limits)
    return Identity(tenant=store.get_tenant(tenant_id), key_id="k1")


def rows(ledger: UsageLedger) -> list[dict[str, Any]]:
    return list(ledger._pending)


def held(guard: Guard, tenant_id: str = "acme") -> int:
    quota = guard.fallback.quota
    assert isinstance(quota, InProcessQuota)
    return quota.held(tenant_id)


async def refused(call: Awaitable[object]) -> HerdError:
    with pytest.raises(HerdError) as info:
        await call
    return info.value


async def settle(guard: Guard, admission: Admission, completion: int = 0, status: str = "ok") -> None:
    await guard.settle(admission, completion_tokens=completion, cached_tokens=0, status=status)


# --- item 14: refusals write no rows ------------------------------------------------------------------------
def test_refused_requests_write_no_ledger_rows(store: TenantStore) -> None:
    who = identity(store, requests_per_min=1, max_output_tokens=10)
    ledger = UsageLedger(store)
    guard = Guard(store, InProcessRateLimiter(), ledger)

    async def main() -> None:
        admission = await guard.admit(who, "llama", "r0", 5, 5)
        await settle(guard, admission, completion=5)
        for n in range(20):  # over the rate: 429 every time
            assert http_status(await refused(guard.admit(who, "llama", f"r{n + 1}", 5, 5))) == 429
        store.update_tenant("acme", requests_per_min=None)
        who.tenant.requests_per_min = None
        for n in range(5):  # over the output cap: 400, the request settled without a row
            assert http_status(await refused(guard.admit(who, "llama", f"c{n}", 5, 50))) == 400
        assert await ledger.flush()

    run(main())
    assert [r["request_id"] for r in rows(ledger)] == []
    assert [(r.request_id, r.status) for r in store.usage_rows("acme")] == [("r0", "ok")]


# --- the API: what each step holds and writes ---------------------------------------------------------------
def test_enter_holds_a_slot_that_settle_frees_and_a_refusal_holds_nothing(store: TenantStore) -> None:
    who = identity(store, max_concurrent=2)
    ledger = UsageLedger(store)
    guard = Guard(store, InProcessRateLimiter(), ledger)

    async def main() -> None:
        first, second = await guard.enter(who, "llama", "a"), await guard.enter(who, "llama", "b")
        err = await refused(guard.enter(who, "llama", "c"))
        assert (err.reason, http_status(err)) == ("max_concurrent", 429)
        assert held(guard) == 2
        await settle(guard, first, status="cancelled")  # entered, never reserved: no row
        third = await guard.enter(who, "llama", "c")
        await guard.reserve(third, 3, 4)
        assert list(ledger._open) == ["c"], "a reserved request is journaled as open"
        await settle(guard, second)
        await settle(guard, third, completion=2)
        assert held(guard) == 0

    run(main())
    assert [(r["request_id"], r["prompt_tokens"], r["completion_tokens"]) for r in rows(ledger)] == [("c", 3, 2)]


def test_a_reserve_refusal_is_settled_without_a_row_and_frees_the_slot(store: TenantStore) -> None:
    who = identity(store, max_concurrent=1, input_tokens_per_min=100)
    ledger = UsageLedger(store)
    guard = Guard(store, InProcessRateLimiter(), ledger)

    async def main() -> None:
        admission = await guard.enter(who, "llama", "a")
        err = await refused(guard.reserve(admission, 101, 1))
        assert err.reason == "input_tokens_per_min"
        await settle(guard, admission, status="refused")
        assert held(guard) == 0
        again = await guard.enter(who, "llama", "b")
        await guard.reserve(again, 100, 1)
        await settle(guard, again, completion=1)

    run(main())
    assert [r["request_id"] for r in rows(ledger)] == ["b"]


# --- item 6: the budget counts reservations of requests in flight -------------------------------------------
def test_the_budget_counts_what_requests_in_flight_reserved(store: TenantStore) -> None:
    who = identity(store, monthly_token_budget=100)
    guard = Guard(store, InProcessRateLimiter(), UsageLedger(store))

    async def main() -> None:
        first = await guard.admit(who, "llama", "a", 10, 60)  # 70 of 100 reserved
        err = await refused(guard.admit(who, "llama", "b", 10, 60))  # 140 would be over
        assert (err.reason, http_status(err)) == ("monthly_token_budget", 429)
        await settle(guard, first, completion=5)  # it used 15: 85 left
        second = await guard.admit(who, "llama", "c", 10, 75)
        err = await refused(guard.enter(who, "llama", "d"))  # 15 used + 85 reserved: nothing left to enter with
        assert err.reason == "monthly_token_budget"
        await settle(guard, second, completion=75)
        assert await refused(guard.enter(who, "llama", "e"))  # 100 used

    run(main())


def test_a_request_without_max_tokens_reserves_the_default_and_pays_the_rest_at_settle(store: TenantStore) -> None:
    who = identity(store, output_tokens_per_min=2000)
    limiter = InProcessRateLimiter(clock=lambda: 1000.0)
    guard = Guard(store, limiter, UsageLedger(store), default_output_reservation_tokens=100)

    async def main() -> None:
        whole_context = 100_000  # the room left in the context: far more than a minute's output allowance
        admission = await guard.enter(who, "llama", "a")
        await guard.reserve(admission, 10, whole_context, max_tokens_given=False)
        assert admission.reserved_output == 100
        await settle(guard, admission, completion=300)  # 200 beyond the reservation: charged now
        last = await guard.enter(who, "llama", "b")
        assert (await refused(guard.reserve(last, 10, 1701))).reason == "output_tokens_per_min"
        await settle(guard, last, status="refused")
        fits = await guard.admit(who, "llama", "c", 10, 1700)
        await settle(guard, fits, completion=1700)

    run(main())


# --- item 5: faults never leak a slot or drop a row ---------------------------------------------------------
class Flaky:
    """A shared limiter (in process underneath) whose calls named in `failing` raise, as a Redis that went
    away does (or TimeoutError, as RedisRateLimiter's bounded calls do when Redis hangs)."""

    def __init__(self, *failing: str, error: Exception | None = None) -> None:
        self.inner = InProcessRateLimiter()
        self.failing = set(failing)
        self.error = error or ConnectionError("Redis went away")

    async def acquire(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> Decision:
        self._maybe_fail("acquire")
        return await self.inner.acquire(key, charges, now=now)

    async def refund(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> None:
        self._maybe_fail("refund")
        await self.inner.refund(key, charges, now=now)

    async def take(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> None:
        self._maybe_fail("take")
        await self.inner.take(key, charges, now=now)

    def _maybe_fail(self, call: str) -> None:
        if call in self.failing:
            raise self.error


def test_a_limiter_error_at_settle_keeps_the_row_and_frees_the_slot(store: TenantStore) -> None:
    who = identity(store, max_concurrent=1, output_tokens_per_min=1000)
    ledger = UsageLedger(store)
    quota = InProcessQuota()
    guard = Guard(store, Flaky("refund", "take"), ledger, quota=quota)

    async def main() -> None:
        admission = await guard.admit(who, "llama", "a", 5, 50)
        await settle(guard, admission, completion=10)  # 40 to give back: the refund raises
        assert quota.held("acme") == 0
        again = await guard.admit(who, "llama", "b", 5, 50)
        await settle(guard, again, completion=60)  # 10 to charge: the take raises
        assert quota.held("acme") == 0

    run(main())
    assert [(r["request_id"], r["completion_tokens"]) for r in rows(ledger)] == [("a", 10), ("b", 60)]


def test_a_shared_limiter_failing_after_enter_neither_refuses_nor_leaks(store: TenantStore) -> None:
    """Entered on the shared limits, which then time out: reserve lets the request go on (it holds a slot),
    settle still writes its row and frees the slot."""
    who = identity(store, max_concurrent=1, output_tokens_per_min=1000)
    ledger = UsageLedger(store)
    shared, quota = Flaky(error=TimeoutError()), InProcessQuota()
    guard = Guard(store, shared, ledger, quota=quota)

    async def main() -> None:
        admission = await guard.enter(who, "llama", "a")
        assert admission.limits is guard.limits
        shared.failing = {"acquire", "refund", "take"}
        await guard.reserve(admission, 5, 5)
        await settle(guard, admission, completion=5)
        assert quota.held("acme") == 0

    run(main())
    assert [r["request_id"] for r in rows(ledger)] == ["a"]


@pytest.fixture
def unwritable_journal(store: TenantStore, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[UsageLedger]:
    ledger = UsageLedger(store, spill_path=tmp_path / "usage.jsonl")
    assert ledger.journal is not None

    def full(_row: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ledger.journal, "opened", full)
    monkeypatch.setattr(ledger.journal, "finished", full)
    yield ledger


def test_a_journal_that_cannot_be_written_leaks_no_slot_and_drops_no_row(
        store: TenantStore, unwritable_journal: UsageLedger) -> None:
    who = identity(store, max_concurrent=1)
    guard = Guard(store, InProcessRateLimiter(), unwritable_journal)

    async def main() -> None:
        for request_id in ("a", "b"):
            admission = await guard.admit(who, "llama", request_id, 5, 5)
            await settle(guard, admission, completion=3)
        assert held(guard) == 0
        assert await unwritable_journal.flush()

    run(main())
    assert [r.request_id for r in store.usage_rows("acme")] == ["a", "b"]


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers: a Redis that hangs."""
    connections: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in connections:
            writer.close()
        server.close()


def test_a_redis_that_hangs_fails_open_to_this_gateways_own_limits(store: TenantStore) -> None:
    who = identity(store, max_concurrent=1, requests_per_min=100)
    ledger = UsageLedger(store)

    async def main() -> None:
        async with silent_server() as port:
            client = redis.asyncio.Redis(host="127.0.0.1", port=port)
            guard = Guard(store, RedisRateLimiter(client, timeout_s=0.05), ledger,
                          quota=RedisQuota(client, lease_s=60, timeout_s=0.05))
            admission = await guard.enter(who, "llama", "a")
            assert admission.limits is guard.fallback
            err = await refused(guard.enter(who, "llama", "b"))  # this gateway's own max_concurrent holds
            assert err.reason == "max_concurrent"
            await guard.reserve(admission, 5, 5)
            await settle(guard, admission, completion=5)
            assert held(guard) == 0
            await client.aclose()

    run(main())
    assert [r["request_id"] for r in rows(ledger)] == ["a"]


def test_a_database_that_hangs_is_a_503_not_a_stall(store: TenantStore, monkeypatch: pytest.MonkeyPatch) -> None:
    released = threading.Event()
    monkeypatch.setattr(store, "authenticate", lambda _plaintext: released.wait())
    guard = Guard(store, InProcessRateLimiter(), UsageLedger(store), database_timeout_s=0.05)

    async def main() -> HerdError:
        try:
            return await refused(guard.authenticate("hk_abcdefgh_" + "x" * 32))
        finally:
            released.set()

    err = run(main())
    assert http_status(err) == 503 and err.retry_after_s
