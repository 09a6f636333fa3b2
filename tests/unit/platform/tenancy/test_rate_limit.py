"""Rate limiting: the behaviour every backend shares (`RateLimiterContract`, run here in process and in
tests/integration/platform/test_rate_limit_redis.py against Redis), then what only the in-process one does.
All time is injected; nothing sleeps."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable

import pytest

from herd.platform.tenancy.rate_limit import (
    Charge,
    Decision,
    InProcessRateLimiter,
    Limit,
    RateLimiter,
    gcra_acquire,
    gcra_refund,
    gcra_take,
)

T0 = 1_000.0
REQUESTS = Limit("requests_per_min", 60)  # one unit a second
TOKENS = Limit("input_tokens_per_min", 100)  # one unit per 0.6 s

Body = Callable[[RateLimiter], Awaitable[None]]
Runner = Callable[[Body], None]


async def admitted(limiter: RateLimiter, key: str, charges: list[Charge], now: float, tries: int) -> int:
    """How many of `tries` identical calls at one instant are admitted."""
    return sum([(await limiter.acquire(key, charges, now=now)).allowed for _ in range(tries)])


class RateLimiterContract:
    """Every backend, with explicit `now`. A subclass supplies the `run` fixture: run(body) calls
    body(limiter) on a fresh limiter inside one event loop."""

    @pytest.mark.parametrize("per_minute", [60, 7, 1000])
    def test_a_burst_admits_exactly_one_minutes_allowance(self, run: Runner, per_minute: int) -> None:
        limit = Limit("requests_per_min", per_minute)

        async def body(limiter: RateLimiter) -> None:
            assert await admitted(limiter, "t", [Charge(limit, 1)], T0, per_minute + 5) == per_minute

        run(body)

    def test_refills_continuously(self, run: Runner) -> None:
        async def body(limiter: RateLimiter) -> None:
            assert await admitted(limiter, "t", [Charge(REQUESTS, 1)], T0, 60) == 60
            refused = await limiter.acquire("t", [Charge(REQUESTS, 1)], now=T0)
            assert refused == Decision(allowed=False, limit_name="requests_per_min", retry_after_s=pytest.approx(1.0))
            assert await admitted(limiter, "t", [Charge(REQUESTS, 1)], T0 + 0.99, 1) == 0
            assert await admitted(limiter, "t", [Charge(REQUESTS, 1)], T0 + 1.0, 5) == 1
            assert await admitted(limiter, "t", [Charge(REQUESTS, 1)], T0 + 11.0, 15) == 10
            assert await admitted(limiter, "t", [Charge(REQUESTS, 1)], T0 + 1_000.0, 70) == 60  # no more than a burst

        run(body)

    def test_a_call_is_all_or_nothing(self, run: Runner) -> None:
        async def body(limiter: RateLimiter) -> None:
            assert (await limiter.acquire("t", [Charge(REQUESTS, 1), Charge(TOKENS, 80)], now=T0)).allowed
            refused = await limiter.acquire("t", [Charge(REQUESTS, 1), Charge(TOKENS, 30)], now=T0)
            # 110 tokens cost 66 s of a 60 s window: retry in 6 s. The request was not taken:
            assert refused == Decision(False, "input_tokens_per_min", pytest.approx(6.0))
            assert await admitted(limiter, "t", [Charge(REQUESTS, 1)], T0, 60) == 59
            assert (await limiter.acquire("t", [Charge(TOKENS, 20)], now=T0)).allowed

        run(body)

    def test_names_the_limit_with_the_longest_wait(self, run: Runner) -> None:
        one_a_minute = Limit("requests_per_min", 1)

        def both_orders(tokens: int) -> list[list[Charge]]:
            request, tokens_charge = Charge(one_a_minute, 1), Charge(TOKENS, tokens)
            return [[request, tokens_charge], [tokens_charge, request]]

        async def body(limiter: RateLimiter) -> None:
            assert (await limiter.acquire("t", [Charge(one_a_minute, 1), Charge(TOKENS, 90)], now=T0)).allowed
            # 30 s on, a request needs 30 s more and 100 tokens (90 + 100) * 0.6 - 30 - 60 = 24 s: requests name it.
            for charges in both_orders(100):
                refused = await limiter.acquire("t", charges, now=T0 + 30.0)
                assert refused == Decision(False, "requests_per_min", pytest.approx(30.0))
            assert (await limiter.acquire("u", [Charge(one_a_minute, 1)], now=T0)).allowed
            assert (await limiter.acquire("u", [Charge(TOKENS, 100)], now=T0 + 30.0)).allowed
            # 40 s in, a request needs 20 s more and 100 tokens 50 s: the tokens name it.
            for charges in both_orders(100):
                refused = await limiter.acquire("u", charges, now=T0 + 40.0)
                assert refused == Decision(False, "input_tokens_per_min", pytest.approx(50.0))
            for charges in both_orders(10):  # 10 tokens fit at 40 s: only the request refuses
                refused = await limiter.acquire("u", charges, now=T0 + 40.0)
                assert refused == Decision(False, "requests_per_min", pytest.approx(20.0))

        run(body)

    def test_a_refund_gives_capacity_back(self, run: Runner) -> None:
        async def body(limiter: RateLimiter) -> None:
            assert (await limiter.acquire("t", [Charge(TOKENS, 100)], now=T0)).allowed  # reserved max_tokens
            assert not (await limiter.acquire("t", [Charge(TOKENS, 1)], now=T0)).allowed
            await limiter.refund("t", [Charge(TOKENS, 40)], now=T0)  # only 60 were generated
            assert await admitted(limiter, "t", [Charge(TOKENS, 1)], T0, 50) == 40

        run(body)

    def test_a_refund_never_fills_the_bucket_past_one_window(self, run: Runner) -> None:
        async def body(limiter: RateLimiter) -> None:
            assert (await limiter.acquire("t", [Charge(TOKENS, 100)], now=T0)).allowed
            # 60 s later the bucket has refilled; giving the 100 back as well must not make room for 200.
            await limiter.refund("t", [Charge(TOKENS, 100)], now=T0 + 60.0)
            assert await admitted(limiter, "t", [Charge(TOKENS, 1)], T0 + 60.0, 150) == 100
            await limiter.refund("u", [Charge(TOKENS, 100)], now=T0)  # never charged at all
            assert await admitted(limiter, "u", [Charge(TOKENS, 1)], T0, 150) == 100

        run(body)

    def test_take_bills_units_already_spent_even_past_the_limit(self, run: Runner) -> None:
        async def body(limiter: RateLimiter) -> None:
            assert (await limiter.acquire("t", [Charge(TOKENS, 50)], now=T0)).allowed  # a reservation of 50
            await limiter.take("t", [Charge(TOKENS, 80)], now=T0)  # it produced 130: 80 more, into debt
            refused = await limiter.acquire("t", [Charge(TOKENS, 1)], now=T0)
            assert refused == Decision(False, "input_tokens_per_min", pytest.approx(18.6))  # 131 tokens: 78.6 s of TAT
            assert await admitted(limiter, "t", [Charge(TOKENS, 1)], T0 + 18.6, 5) == 1  # the debt is waited out
            await limiter.take("u", [Charge(TOKENS, 500)], now=T0)  # more than a window at once: still billed
            assert not (await limiter.acquire("u", [Charge(TOKENS, 1)], now=T0 + 60.0)).allowed

        run(body)

    def test_keys_and_limits_are_independent(self, run: Runner) -> None:
        other = Limit("output_tokens_per_min", 60)

        async def body(limiter: RateLimiter) -> None:
            assert await admitted(limiter, "a", [Charge(REQUESTS, 1)], T0, 70) == 60
            assert await admitted(limiter, "b", [Charge(REQUESTS, 1)], T0, 70) == 60
            assert await admitted(limiter, "a", [Charge(other, 1)], T0, 70) == 60
            assert await admitted(limiter, "a:requests_per_min", [Charge(REQUESTS, 1)], T0, 70) == 60

        run(body)

    def test_a_charge_larger_than_the_window_is_refused_forever(self, run: Runner) -> None:
        async def body(limiter: RateLimiter) -> None:
            refused = await limiter.acquire("t", [Charge(REQUESTS, 1), Charge(TOKENS, 101)], now=T0)
            assert refused == Decision(allowed=False, limit_name="input_tokens_per_min", retry_after_s=math.inf)
            assert refused.too_large
            assert await admitted(limiter, "t", [Charge(REQUESTS, 1)], T0, 70) == 60  # nothing was taken
            assert (await limiter.acquire("t", [Charge(TOKENS, 100)], now=T0)).allowed  # exactly a window fits

        run(body)

    def test_bad_calls_raise_without_naming_the_tenant(self, run: Runner) -> None:
        async def body(limiter: RateLimiter) -> None:
            with pytest.raises(ValueError, match="requests_per_min") as err:
                await limiter.acquire("tenant-secret", [Charge(REQUESTS, 1), Charge(Limit("requests_per_min", 5), 1)])
            assert "tenant-secret" not in str(err.value)

        run(body)

    def test_agrees_with_the_pure_model(self, run: Runner) -> None:
        rng = random.Random(11)
        limits = [REQUESTS, TOKENS, Limit("output_tokens_per_min", 7)]

        async def body(limiter: RateLimiter) -> None:
            model: dict[str, dict[str, float]] = {}
            now, outcomes = T0, []
            for _ in range(400):
                now += rng.choice([0.0] * 6 + [0.37, 1.9, 13.0])
                key = rng.choice(["a", "b"])
                charges = [Charge(limit, rng.choice([0, 1, 3, 7])) for limit in rng.sample(limits, rng.randint(1, 3))]
                if rng.random() < 0.1:
                    await limiter.take(key, charges, now=now)
                    model[key] = gcra_take(model.get(key, {}), charges, now)
                elif rng.random() < 0.2:
                    await limiter.refund(key, charges, now=now)
                    model[key] = gcra_refund(model.get(key, {}), charges, now)
                else:
                    expected, model[key] = gcra_acquire(model.get(key, {}), charges, now)
                    assert await limiter.acquire(key, charges, now=now) == expected
                    outcomes.append(expected.allowed)
            assert 50 < sum(outcomes) < len(outcomes) - 50  # both paths, many times

        run(body)


class TestInProcess(RateLimiterContract):
    @pytest.fixture
    def run(self) -> Runner:
        def clock() -> float:
            raise AssertionError("an explicit `now` must win over the clock")

        def runner(body: Body) -> None:
            asyncio.run(body(InProcessRateLimiter(clock=clock)))

        return runner


def test_uses_the_injected_clock() -> None:
    t = [T0]
    limiter = InProcessRateLimiter(clock=lambda: t[0])

    async def main() -> None:
        assert sum([(await limiter.acquire("t", [Charge(REQUESTS, 1)])).allowed for _ in range(70)]) == 60
        t[0] += 2.0
        assert sum([(await limiter.acquire("t", [Charge(REQUESTS, 1)])).allowed for _ in range(5)]) == 2

    asyncio.run(main())


def test_concurrent_callers_get_exactly_the_burst() -> None:
    limiter = InProcessRateLimiter(clock=lambda: T0)

    async def main() -> list[Decision]:
        return await asyncio.gather(*[limiter.acquire("t", [Charge(REQUESTS, 1)]) for _ in range(200)])

    assert sum(d.allowed for d in asyncio.run(main())) == 60


def test_idle_tenants_are_forgotten() -> None:
    limiter = InProcessRateLimiter(clock=lambda: T0)

    async def main() -> None:
        for i in range(100):
            await limiter.acquire(f"t{i}", [Charge(REQUESTS, 1)], now=T0)
        assert len(limiter._tats) == 100
        await limiter.acquire("late", [Charge(REQUESTS, 1)], now=T0 + 61.0)  # a window on: the rest are full again
        assert set(limiter._tats) == {"late"}
        await limiter.refund("late", [Charge(REQUESTS, 1)], now=T0 + 61.0)
        assert limiter._tats == {}

    asyncio.run(main())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Limit("requests_per_min", 0), "requests_per_min"),
        (lambda: Limit("input_tokens_per_min", -5), "input_tokens_per_min"),
        (lambda: Limit("output_tokens_per_min", math.nan), "output_tokens_per_min"),
        (lambda: Limit("", 10), "name"),
        (lambda: Charge(TOKENS, -1), "input_tokens_per_min"),
        (lambda: Charge(TOKENS, math.inf), "input_tokens_per_min"),
    ],
)
def test_bad_limits_and_charges_raise(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_a_refusal_leaves_the_state_as_it_was() -> None:
    tats = {"input_tokens_per_min": T0 + 30.0}
    decision, after = gcra_acquire(tats, [Charge(REQUESTS, 1), Charge(TOKENS, 60)], T0)
    assert decision == Decision(allowed=False, limit_name="input_tokens_per_min", retry_after_s=pytest.approx(6.0))
    assert after == tats
