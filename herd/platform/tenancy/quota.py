"""Per-tenant quotas that are not rates: requests at once (`max_concurrent`) and the monthly token budget,
in process or shared through Redis by every gateway.

The invariant, per tenant: a request holds one slot from `enter` to `release`, and the tokens it reserved
(prompt + output reservation) from `reserve` to `release`. `enter` admits iff the slots held are fewer than
`max_concurrent` and `used + reserved < budget`; `reserve` admits iff `used + reserved + tokens <= budget`;
`release` frees both and adds the tokens the request really used to `used`. So N gateways sharing one Redis
together hold at most `max_concurrent` slots, and requests in flight can overrun the budget by no more than
what they produce beyond their reservations.

`used` is this month's usage: read from the database the first time a month is asked about (in Redis: by
whichever gateway finds the month's counter missing, once), then kept up to date by `release`. Rows a
gateway has queued but not yet written when the counter is read are missed once; that is the whole error.

In Redis a slot is a member of a sorted set scored by its lease's end (`lease_s` after `enter`, the longest a
request may run): the slots and reservations of a gateway that died expire with their lease instead of
holding the tenant's quota forever.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from herd.platform.tenancy.rate_limit import lua_now

if TYPE_CHECKING:
    import redis.asyncio

UsedTokens = Callable[[], Awaitable[int]]
"""This tenant's tokens so far this month, by the database (asked only when a quota does not know)."""

MONTH_TTL_S = 40 * 86_400  # a month's usage counter outlives its month


@dataclass(frozen=True)
class Caps:
    """A tenant's quotas; None: no limit."""

    max_concurrent: int | None
    monthly_token_budget: int | None


class Quota(Protocol):
    async def enter(self, tenant_id: str, request_id: str, month: str, caps: Caps, used: UsedTokens) -> str | None:
        """Hold a slot for the request; the name of the refusing limit, or None when held."""
        ...

    async def reserve(self, tenant_id: str, request_id: str, month: str, tokens: int, caps: Caps,
                      used: UsedTokens) -> bool:
        """Reserve `tokens` of the month's budget for a request that holds a slot; False: over budget."""
        ...

    async def release(self, tenant_id: str, request_id: str, month: str, used_tokens: int) -> None:
        """The request ended: free its slot and reservation, and count the tokens it used this month."""
        ...


class InProcessQuota:
    """One gateway's quotas in dicts. No call awaits between its check and its update (the database read of
    `used` comes first), so each is atomic on the event loop."""

    def __init__(self) -> None:
        self._slots: dict[str, set[str]] = defaultdict(set)  # tenant -> requests holding a slot
        self._reserved: dict[str, dict[str, int]] = defaultdict(dict)  # tenant -> request -> tokens reserved
        self._used: dict[str, tuple[str, int]] = {}  # tenant -> (month, tokens used)

    async def enter(self, tenant_id: str, request_id: str, month: str, caps: Caps, used: UsedTokens) -> str | None:
        counted = await self._counted(tenant_id, month, caps, used)
        if caps.max_concurrent is not None and len(self._slots[tenant_id]) >= caps.max_concurrent:
            return "max_concurrent"
        if caps.monthly_token_budget is not None and counted + self.reserved(tenant_id) >= caps.monthly_token_budget:
            return "monthly_token_budget"
        self._slots[tenant_id].add(request_id)
        return None

    async def reserve(self, tenant_id: str, request_id: str, month: str, tokens: int, caps: Caps,
                      used: UsedTokens) -> bool:
        counted = await self._counted(tenant_id, month, caps, used)
        budget = caps.monthly_token_budget
        if budget is not None and counted + self.reserved(tenant_id) + tokens > budget:
            return False
        reserved = self._reserved[tenant_id]
        reserved[request_id] = reserved.get(request_id, 0) + tokens
        return True

    async def release(self, tenant_id: str, request_id: str, month: str, used_tokens: int) -> None:
        self._slots[tenant_id].discard(request_id)
        self._reserved[tenant_id].pop(request_id, None)
        for table in (self._slots, self._reserved):
            if not table[tenant_id]:
                del table[tenant_id]
        known = self._used.get(tenant_id)
        if known is not None and known[0] == month:
            self._used[tenant_id] = (month, known[1] + used_tokens)

    def held(self, tenant_id: str) -> int:
        """Slots the tenant holds now."""
        return len(self._slots.get(tenant_id, ()))

    def reserved(self, tenant_id: str) -> int:
        """Tokens the tenant's requests in flight have reserved."""
        return sum(self._reserved.get(tenant_id, {}).values())

    async def _counted(self, tenant_id: str, month: str, caps: Caps, used: UsedTokens) -> int:
        if caps.monthly_token_budget is None:
            return 0
        known = self._used.get(tenant_id)
        if known is None or known[0] != month:
            known = (month, await used())
            self._used[tenant_id] = known
        return known[1]


# KEYS: the tenant's slots (sorted set: request id -> lease end, s), its reservations (hash: request id ->
# tokens, and "#total"), the month's usage (string: tokens). All carry the tenant's hash tag (cluster-safe).
# ARGV: mode ("enter" | "reserve" | "release"), request id, now ("" = Redis server TIME), lease_s,
#   max_concurrent (-1: none), budget (-1: none), tokens (reserve: to reserve; release: used), seed ("": none).
# Returns {1} done, {0, limit name} refused (nothing written), {-1} the month's usage is unknown: call again
# with the database's count as seed. Expired leases are dropped first, with their reservations.
_LUA = lua_now(3) + """local mode, id, lease = ARGV[1], ARGV[2], tonumber(ARGV[4])
local limit, budget, tokens = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local function drop(request)
  local r = tonumber(redis.call("HGET", KEYS[2], request))
  if r then
    redis.call("HINCRBY", KEYS[2], "#total", -r)
    redis.call("HDEL", KEYS[2], request)
  end
end
for _, gone in ipairs(redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", now)) do drop(gone) end
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
if mode == "release" then
  redis.call("ZREM", KEYS[1], id)
  drop(id)
  if tokens > 0 and redis.call("EXISTS", KEYS[3]) == 1 then redis.call("INCRBY", KEYS[3], tokens) end
  return {1}
end
local used = 0
if budget >= 0 then
  local known = redis.call("GET", KEYS[3])
  if not known then
    if ARGV[8] == "" then return {-1} end
    redis.call("SET", KEYS[3], ARGV[8], "EX", MONTH_TTL_S)
    known = ARGV[8]
  end
  used = tonumber(known)
end
local reserved = tonumber(redis.call("HGET", KEYS[2], "#total")) or 0
if mode == "enter" then
  if limit >= 0 and redis.call("ZCARD", KEYS[1]) >= limit then return {0, "max_concurrent"} end
  if budget >= 0 and used + reserved >= budget then return {0, "monthly_token_budget"} end
  redis.call("ZADD", KEYS[1], now + lease, id)
else
  if budget >= 0 and used + reserved + tokens > budget then return {0, "monthly_token_budget"} end
  redis.call("HINCRBY", KEYS[2], id, tokens)
  redis.call("HINCRBY", KEYS[2], "#total", tokens)
end
local ttl_ms = math.ceil(lease * 1000) + 1000
redis.call("PEXPIRE", KEYS[1], ttl_ms)
redis.call("PEXPIRE", KEYS[2], ttl_ms)
return {1}
""".replace("MONTH_TTL_S", str(MONTH_TTL_S))


class RedisQuota:
    """Quotas shared by every gateway: one Lua script per call does the check-and-set atomically. Each call
    gives up after `timeout_s` (TimeoutError)."""

    def __init__(self, client: redis.asyncio.Redis, *, lease_s: float, prefix: str = "herd:quota:",
                 timeout_s: float = 1.0) -> None:
        for name, value in (("lease_s", lease_s), ("timeout_s", timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self._client = client
        self._prefix = prefix
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self._script = client.register_script(_LUA)

    def keys(self, tenant_id: str, month: str) -> list[str]:
        """The tenant's slots, reservations and the month's usage."""
        tag = f"{self._prefix}{{{tenant_id}}}"
        return [f"{tag}:slots", f"{tag}:reserved", f"{tag}:used:{month}"]

    async def enter(self, tenant_id: str, request_id: str, month: str, caps: Caps, used: UsedTokens) -> str | None:
        return await self._admit("enter", tenant_id, request_id, month, 0, caps, used)

    async def reserve(self, tenant_id: str, request_id: str, month: str, tokens: int, caps: Caps,
                      used: UsedTokens) -> bool:
        return await self._admit("reserve", tenant_id, request_id, month, tokens, caps, used) is None

    async def release(self, tenant_id: str, request_id: str, month: str, used_tokens: int) -> None:
        await self._call("release", tenant_id, request_id, month, used_tokens, Caps(None, None), "")

    async def _admit(self, mode: str, tenant_id: str, request_id: str, month: str, tokens: int, caps: Caps,
                     used: UsedTokens) -> str | None:
        if caps.monthly_token_budget is None and (mode == "reserve" or caps.max_concurrent is None):
            return None  # nothing to count: no round trip (release of a slot never taken is a no-op)
        reply = await self._call(mode, tenant_id, request_id, month, tokens, caps, "")
        if int(reply[0]) == -1:  # the month's counter is missing: the database's count seeds it
            reply = await self._call(mode, tenant_id, request_id, month, tokens, caps, str(await used()))
        if int(reply[0]) == 1:
            return None
        name = reply[1]
        return name.decode() if isinstance(name, bytes) else str(name)

    async def _call(self, mode: str, tenant_id: str, request_id: str, month: str, tokens: int, caps: Caps,
                    seed: str) -> list[int | bytes | str]:
        args: list[str | float] = [
            mode, request_id, "", self.lease_s, _or_none(caps.max_concurrent), _or_none(caps.monthly_token_budget),
            tokens, seed]
        async with asyncio.timeout(self.timeout_s):
            return list(await self._script(keys=self.keys(tenant_id, month), args=args))


def _or_none(value: int | None) -> int:
    return -1 if value is None else value


__all__ = ["Caps", "InProcessQuota", "Quota", "RedisQuota", "UsedTokens"]
