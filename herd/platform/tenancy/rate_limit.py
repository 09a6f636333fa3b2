"""Per-tenant rate limits: GCRA on requests and tokens, in process or shared through Redis.

The invariant: for every (tenant, limit) the state is one number, the theoretical arrival time TAT, and
a charge of `amount` units is admitted iff `max(TAT, now) + amount * T - now <= WINDOW_S`, where
T = WINDOW_S / per_minute is the emission interval. A tenant may therefore spend one minute's allowance
at once and then refills continuously; over any interval of L seconds the units charged minus the units
refunded never exceed `per_minute * (1 + L / WINDOW_S)`.

Refund rule: `TAT = max(TAT - amount * T, now)`. Giving units back moves TAT earlier by exactly their
cost, so units reserved (output tokens from `max_tokens`) and then refunded cost nothing, but it never
moves TAT before `now`: the bucket never holds more than one window, so refunds cannot bank capacity
beyond the burst, and the bound above still holds because each refund lowers `max(TAT, now)` by at most
the refunded units' cost (it is the ordinary GCRA proof with refunds counted as negative charges).

Take rule: `TAT = max(TAT, now) + amount * T`, admitted whatever it costs. It bills units already spent
(output tokens beyond a request's reservation): the bucket may go into debt, and later charges wait it out.

A call is all-or-nothing across its charges: if any limit refuses, nothing is taken, and the decision
names the limit with the longest wait. A single charge larger than a whole window can never pass; it is
refused at once with `retry_after_s = math.inf` (`Decision.too_large`). Tenant keys never appear in
error messages: the gateway decides what a client sees.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import redis.asyncio

WINDOW_S = 60.0  # the burst: one minute's allowance may be spent at once
EPS_S = 1e-6  # float slack on the admission test (Redis TIME as epoch seconds in a double is ~0.2 us coarse)


@dataclass(frozen=True)
class Limit:
    """A rate: `per_minute` units a minute, refilled continuously, with one minute's worth as burst."""

    name: str  # e.g. "requests_per_min", "input_tokens_per_min", "output_tokens_per_min"
    per_minute: float  # units per minute, > 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError(f"a rate limit needs a name, got {self.name!r}")
        if not (math.isfinite(self.per_minute) and self.per_minute > 0):
            raise ValueError(f"rate limit {self.name!r}: per_minute must be a positive number, got {self.per_minute!r}")

    @property
    def interval_s(self) -> float:
        """Seconds of TAT that one unit costs (the GCRA emission interval)."""
        return WINDOW_S / self.per_minute


@dataclass(frozen=True)
class Charge:
    """A cost of `amount` units against `limit`."""

    limit: Limit
    amount: float  # units, >= 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.amount) and self.amount >= 0):
            raise ValueError(f"charge against {self.limit.name!r}: amount must be >= 0, got {self.amount!r}")


@dataclass(frozen=True)
class Decision:
    """The answer to `acquire`: admitted, or which limit refused and when to retry."""

    allowed: bool
    limit_name: str | None  # the refusing limit; None when allowed
    retry_after_s: float  # 0.0 when allowed; math.inf when the charge alone exceeds the limit's window

    @property
    def too_large(self) -> bool:
        """The request alone exceeds the limit: no amount of waiting admits it."""
        return not self.allowed and math.isinf(self.retry_after_s)


ALLOWED = Decision(allowed=True, limit_name=None, retry_after_s=0.0)


class RateLimiter(Protocol):
    async def acquire(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> Decision:
        """Take all charges for tenant `key`, or none of them if any limit would be exceeded."""
        ...

    async def refund(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> None:
        """Give back (part of) an earlier charge, e.g. output tokens reserved but not generated."""
        ...

    async def take(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> None:
        """Charge units already spent (output beyond a reservation), even past the limit."""
        ...


def _validate(charges: Sequence[Charge], now: float | None) -> None:
    names = [c.limit.name for c in charges]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"each limit may be charged once per call; {duplicates} appear more than once")
    if now is not None and not math.isfinite(now):
        raise ValueError(f"now must be a finite time in seconds, got {now!r}")


def _too_large(charges: Sequence[Charge]) -> Decision | None:
    """A charge that even a full bucket refuses; stateless, so both backends check it before any I/O."""
    for c in charges:
        if c.amount * c.limit.interval_s > WINDOW_S + EPS_S:
            return Decision(allowed=False, limit_name=c.limit.name, retry_after_s=math.inf)
    return None


def gcra_acquire(
    tats: Mapping[str, float], charges: Sequence[Charge], now: float
) -> tuple[Decision, dict[str, float]]:
    """Pure GCRA step: (TAT per limit name, charges, now) -> (decision, updated TATs; unchanged if refused).

    The Lua script below is this function, line for line; the shared test suite holds them equal."""
    new = dict(tats)
    worst: tuple[float, str] | None = None
    for c in charges:
        new_tat = max(tats.get(c.limit.name, now), now) + c.amount * c.limit.interval_s
        retry = new_tat - now - WINDOW_S
        if retry > EPS_S and (worst is None or retry > worst[0]):
            worst = (retry, c.limit.name)
        new[c.limit.name] = new_tat
    if worst is not None:
        return Decision(allowed=False, limit_name=worst[1], retry_after_s=worst[0]), dict(tats)
    return ALLOWED, new


def gcra_refund(tats: Mapping[str, float], charges: Sequence[Charge], now: float) -> dict[str, float]:
    """Pure refund step: each TAT moves earlier by the refunded cost, never before `now`."""
    new = dict(tats)
    for c in charges:
        new[c.limit.name] = max(tats.get(c.limit.name, now) - c.amount * c.limit.interval_s, now)
    return new


def gcra_take(tats: Mapping[str, float], charges: Sequence[Charge], now: float) -> dict[str, float]:
    """Pure take step: each TAT moves later by the charged cost, with no admission test."""
    new = dict(tats)
    for c in charges:
        new[c.limit.name] = max(tats.get(c.limit.name, now), now) + c.amount * c.limit.interval_s
    return new


class InProcessRateLimiter:
    """One gateway's limits in a dict. Each call runs without awaiting, so it is atomic on the event loop;
    a lock makes it safe across threads too. Tenants whose buckets are full again are swept once a window."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[str, dict[str, float]] = {}  # tenant -> limit name -> TAT (s on `clock`)
        self._lock = threading.Lock()
        self._swept_at = -math.inf

    async def acquire(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> Decision:
        _validate(charges, now)
        refused = _too_large(charges)
        if refused is not None:
            return refused
        t = self._clock() if now is None else now
        with self._lock:
            decision, tats = gcra_acquire(self._tats.get(key, {}), charges, t)
            if decision.allowed:
                self._store(key, tats, t)
        return decision

    async def refund(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> None:
        self._apply(gcra_refund, key, charges, now)

    async def take(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> None:
        self._apply(gcra_take, key, charges, now)

    def _apply(self, step: Callable[[Mapping[str, float], Sequence[Charge], float], dict[str, float]], key: str,
               charges: Sequence[Charge], now: float | None) -> None:
        _validate(charges, now)
        t = self._clock() if now is None else now
        with self._lock:
            self._store(key, step(self._tats.get(key, {}), charges, t), t)

    def _store(self, key: str, tats: dict[str, float], now: float) -> None:
        # A TAT at or before now is a full bucket, the same as no entry: drop it so idle tenants cost nothing.
        live = {name: tat for name, tat in tats.items() if tat > now}
        if live:
            self._tats[key] = live
        else:
            self._tats.pop(key, None)
        if now - self._swept_at >= WINDOW_S:
            self._swept_at = now
            for idle in [k for k, v in self._tats.items() if max(v.values()) <= now]:
                del self._tats[idle]


# KEYS[1]: the tenant's hash, field = limit name, value = TAT in seconds ("%.17g", so it round-trips).
# ARGV: mode ("acquire" | "refund" | "take"), now ("" = Redis server TIME), WINDOW_S, EPS_S, then per charge:
#   limit name, interval_s, amount.
# Returns {1} when admitted (always for refund and take), else {0, i, retry_after_s as "%.17g"} with i the 1-based
# index of the charge whose limit waits longest; a refusal writes nothing. Fields at or before now are
# deleted (a full bucket), and the key's TTL is raised to cover its latest TAT, so idle tenants expire.
def lua_now(argument: int) -> str:
    """Lua that sets `now` (seconds) from ARGV[argument], or from Redis's own clock when that is empty."""
    return f"""
local now
if ARGV[{argument}] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[{argument}])
end
"""


_LUA = lua_now(2) + """local mode, window, eps = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local names, tats = {}, {}
local worst, worst_retry = 0, 0
for i = 1, (#ARGV - 4) / 3 do
  local name, interval, amount = ARGV[3 * i + 2], tonumber(ARGV[3 * i + 3]), tonumber(ARGV[3 * i + 4])
  local tat = tonumber(redis.call("HGET", KEYS[1], name)) or now
  local new_tat
  if mode == "refund" then
    new_tat = math.max(tat - amount * interval, now)
  else
    new_tat = math.max(tat, now) + amount * interval
    local retry = new_tat - now - window
    if mode == "acquire" and retry > eps and (worst == 0 or retry > worst_retry) then
      worst, worst_retry = i, retry
    end
  end
  names[i], tats[i] = name, new_tat
end
if worst > 0 then return {0, worst, string.format("%.17g", worst_retry)} end
local latest = now
for i = 1, #names do
  if tats[i] > now then
    redis.call("HSET", KEYS[1], names[i], string.format("%.17g", tats[i]))
    latest = math.max(latest, tats[i])
  else
    redis.call("HDEL", KEYS[1], names[i])
  end
end
local ttl_ms = math.ceil((latest - now) * 1000) + 1000
if redis.call("PTTL", KEYS[1]) < ttl_ms then redis.call("PEXPIRE", KEYS[1], ttl_ms) end
return {1}
"""


class RedisRateLimiter:
    """Limits shared by every gateway replica: one Lua script per call does the check-and-set for all its
    charges atomically on Redis's clock. One hash per tenant, so a call touches one key (cluster-safe). Each
    call gives up after `timeout_s` (TimeoutError), however the client is configured: a Redis that hangs
    cannot stall admission."""

    def __init__(self, client: redis.asyncio.Redis, *, prefix: str = "herd:rl:", timeout_s: float = 1.0) -> None:
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self._client = client
        self._prefix = prefix
        self.timeout_s = timeout_s
        self._script = client.register_script(_LUA)  # EVALSHA, loading the script on NOSCRIPT

    def bucket_key(self, key: str) -> str:
        """The Redis key holding tenant `key`'s TATs."""
        return self._prefix + key

    async def acquire(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> Decision:
        _validate(charges, now)
        refused = _too_large(charges)
        if refused is not None:
            return refused
        if not charges:
            return ALLOWED
        reply = await self._call("acquire", key, charges, now)
        if int(reply[0]) == 1:
            return ALLOWED
        return Decision(allowed=False, limit_name=charges[int(reply[1]) - 1].limit.name,
                        retry_after_s=float(reply[2]))

    async def refund(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> None:
        _validate(charges, now)
        if charges:
            await self._call("refund", key, charges, now)

    async def take(self, key: str, charges: Sequence[Charge], *, now: float | None = None) -> None:
        _validate(charges, now)
        if charges:
            await self._call("take", key, charges, now)

    async def _call(self, mode: str, key: str, charges: Sequence[Charge], now: float | None) -> list[int | bytes | str]:
        args: list[str | float] = [mode, "" if now is None else now, WINDOW_S, EPS_S]
        for c in charges:
            args += [c.limit.name, c.limit.interval_s, c.amount]
        async with asyncio.timeout(self.timeout_s):
            reply = await self._script(keys=[self.bucket_key(key)], args=args)
        return list(reply)
