"""A request of n choices (or best_of candidates) against the tenant's limits: it holds one concurrency slot per
choice, reserves n times its max_tokens, and is refused (400 naming n) when it could never fit the tenant's
concurrency. Every slot comes back at settle."""

from __future__ import annotations

from herd.platform.gateway.errors import http_status
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.quota import InProcessQuota
from herd.platform.tenancy.rate_limit import InProcessRateLimiter
from herd.platform.tenancy.store import TenantStore
from tests.unit.platform.tenancy.test_guard import held, identity, refused, run, settle


def test_a_request_of_n_choices_holds_n_slots_until_settled(store: TenantStore) -> None:
    who = identity(store, max_concurrent=4)
    guard = Guard(store, InProcessRateLimiter(), UsageLedger(store))

    async def main() -> None:
        three = await guard.enter(who, "llama", "a", choices=3)
        assert held(guard) == 3
        err = await refused(guard.enter(who, "llama", "b", choices=2))
        assert http_status(err) == 429 and held(guard) == 3, "a refusal holds nothing"
        one = await guard.enter(who, "llama", "c")
        assert held(guard) == 4
        await settle(guard, three)
        assert held(guard) == 1
        await settle(guard, one)
        assert held(guard) == 0

    run(main())


def test_more_choices_than_the_tenant_may_run_at_once_is_400_naming_n(store: TenantStore) -> None:
    who = identity(store, max_concurrent=2)
    guard = Guard(store, InProcessRateLimiter(), UsageLedger(store))

    async def main() -> None:
        err = await refused(guard.enter(who, "llama", "a", choices=3))
        assert http_status(err) == 400 and err.param == "n" and "max_concurrent" in err.message
        assert held(guard) == 0

    run(main())


def test_the_token_reservation_is_the_prompt_and_n_times_max_tokens(store: TenantStore) -> None:
    who = identity(store, monthly_token_budget=1000)
    guard = Guard(store, InProcessRateLimiter(), UsageLedger(store))
    quota = guard.fallback.quota
    assert isinstance(quota, InProcessQuota)

    async def main() -> None:
        four = await guard.enter(who, "llama", "a", choices=4)
        await guard.reserve(four, 100, 200)  # 100 + 4 * 200
        assert quota.reserved("acme") == 900
        over = await guard.enter(who, "llama", "b", choices=2)
        err = await refused(guard.reserve(over, 10, 50))  # 900 + 10 + 2 * 50 > 1000
        assert http_status(err) == 429
        await settle(guard, over, status="refused")
        await settle(guard, four, completion=4 * 150)
        assert quota.reserved("acme") == 0 and held(guard) == 0

    run(main())
