"""Admission by tenant: who is calling, what they may use, and whether their limits allow it now.

Order, for every request on either door: key -> tenant (401), model allowed (403), then `enter` before any
expensive work (a concurrency slot, requests per minute, a budget not already spent: 429), then, once the
prompt is tokenised, `reserve` (per-tenant context and output caps: 400; input and output tokens per minute
and the monthly budget, counting what requests in flight have reserved: 429), and `settle` exactly once
after every `enter`, whatever happened. Output tokens are reserved from max_tokens (a request without one
reserves at most `default_output_reservation_tokens`); at settle the unused part is given back and any
excess is charged. A request of n choices (best_of candidates: best_of) runs that many sequences: it holds a
concurrency slot for each (the conservative reading: it occupies the replica like n requests), reserves n
times its output tokens, and is refused (400, naming n) when n exceeds the tenant's max_concurrent, which it
could never fit; the per-request caps (max_context, max_output_tokens) apply to each choice. A usage row is
written iff `reserve` passed: refusals are counted by the gateway's metrics, not the ledger, so a flood of
refused requests writes nothing.

Redis down (or hanging past its timeout): this gateway fails open to its own in-process limits (each
gateway then enforces the tenant's limits alone) and tries Redis again after SHARED_RETRY_S. A request that
entered on Redis and finds it failing later is not refused for it: its reservation goes unchecked, and
its slot is freed by its lease if the release cannot reach Redis.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import (
    context_limit,
    database_unavailable,
    invalid_request,
    limit_exceeded,
    output_limit,
    permission_denied,
    unauthenticated,
)
from herd.platform.tenancy.adapters import AdapterRef
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.quota import Caps, InProcessQuota, Quota, UsedTokens
from herd.platform.tenancy.rate_limit import Charge, InProcessRateLimiter, Limit, RateLimiter
from herd.platform.tenancy.schema import Tenant
from herd.platform.tenancy.store import Identity, TenantStore
from herd.protos.herd.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)
ANONYMOUS = Tenant(id="anonymous", name="anonymous", allowed_models=["*"], weight=1.0, priority_class="standard",
                   disabled=False)
SHARED_RETRY_S = 5.0  # after the shared limits fail, this gateway uses its own this long before trying again
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """Where a tenant's limits are kept: rates and quotas, together (Redis, or this process)."""

    rates: RateLimiter
    quota: Quota


@dataclass
class Admission:
    """A request that entered: what it holds and reserved, to settle when it ends."""

    identity: Identity
    model: str
    request_id: str
    month: str  # YYYY-MM whose budget it counts against
    limits: Limits  # where its slot is held
    adapter: str | None = None  # the LoRA adapter's name, when it runs with one (model is the base)
    choices: int = 1  # sequences it runs (n, or best_of): slots held, and its output reservation's multiple
    prompt_tokens: int = 0
    reserved_output: int = 0
    reserved: bool = False  # reserve passed: its usage row is written at settle
    started: float = field(default_factory=time.monotonic)


class Guard:
    def __init__(self, store: TenantStore, limiter: RateLimiter, ledger: UsageLedger, *, quota: Quota | None = None,
                 auth: bool = True, database_timeout_s: float = 5.0, default_output_reservation_tokens: int = 1024,
                 ) -> None:
        if default_output_reservation_tokens < 1:
            raise ValueError(f"default_output_reservation_tokens must be >= 1, got {default_output_reservation_tokens}")
        self.store = store
        self.ledger = ledger
        self.auth = auth
        self.database_timeout_s = database_timeout_s
        self.default_output_reservation_tokens = default_output_reservation_tokens
        self.limits = Limits(limiter, quota or InProcessQuota())
        in_process = isinstance(limiter, InProcessRateLimiter) and isinstance(self.limits.quota, InProcessQuota)
        self.fallback = self.limits if in_process else Limits(InProcessRateLimiter(), InProcessQuota())
        self._shared_down_until = -math.inf

    async def authenticate(self, credential: str | None) -> Identity:
        if not self.auth:
            return Identity(tenant=ANONYMOUS, key_id=None)
        if not credential:
            raise unauthenticated("Missing API key: send 'Authorization: Bearer <key>'.")
        identity = await self._database(self.store.authenticate, credential)
        if identity is None:
            raise unauthenticated("Invalid, revoked or expired API key.")
        return identity

    def authorize(self, identity: Identity, model: str) -> None:
        allowed = identity.tenant.allowed_models or []
        if "*" not in allowed and model not in allowed:
            raise permission_denied(model)

    def allowed_models(self, identity: Identity, models: list[str]) -> list[str]:
        allowed = identity.tenant.allowed_models or []
        return models if "*" in allowed else [m for m in models if m in allowed]

    def adapters(self, identity: Identity) -> Mapping[str, AdapterRef]:
        """The LoRA adapters granted to the caller's tenant, by public name (<model>:<adapter>)."""
        return identity.adapters

    def context(self, identity: Identity) -> pb.TenantContext:
        tenant = identity.tenant
        return pb.TenantContext(tenant_id=tenant.id, weight=tenant.weight or 1.0,
                                sharing_group=tenant.sharing_group or "")

    async def enter(self, identity: Identity, model: str, request_id: str, *, choices: int = 1,
                    adapter: str | None = None) -> Admission:
        """Before any expensive work: a concurrency slot per choice, a request of the per-minute rate, and a budget
        not already spent. A refusal (HerdError) holds nothing and writes no row; otherwise `settle` must follow."""
        tenant, month = identity.tenant, _month()
        caps, used = Caps(tenant.max_concurrent, tenant.monthly_token_budget), self._used_tokens(tenant.id)
        if tenant.max_concurrent is not None and choices > tenant.max_concurrent:
            raise invalid_request(f"n: {choices} choices take {choices} concurrency slots; this tenant's "
                                  f"max_concurrent is {tenant.max_concurrent}", param="n")
        slots = _slot_ids(request_id, choices)

        async def step(limits: Limits) -> Admission:
            taken: list[str] = []
            try:
                for slot in slots:
                    refused = await limits.quota.enter(tenant.id, slot, month, caps, used)
                    if refused is not None:
                        raise _quota_refusal(tenant, refused)
                    taken.append(slot)
                decision = await limits.rates.acquire(tenant.id, _charges(tenant, requests=1))
                if not decision.allowed:
                    raise limit_exceeded(decision.limit_name or "rate", decision.retry_after_s, "per-minute rate")
            except BaseException:
                for slot in taken:
                    await _quietly(limits.quota.release(tenant.id, slot, month, 0))
                raise
            return Admission(identity, model, request_id, month, limits, adapter=adapter, choices=choices)

        if self._shared_up():
            try:
                return await step(self.limits)
            except HerdError:
                raise
            except Exception as err:
                self._shared_failed(err)
        return await step(self.fallback)

    async def reserve(self, admission: Admission, prompt_tokens: int, max_tokens: int, *,
                      max_tokens_given: bool = True) -> None:
        """After tokenising: the tenant's caps (400), tokens per minute and the budget with what requests in
        flight reserved (429). A request without max_tokens (`max_tokens` is then its room) reserves at most
        default_output_reservation_tokens. On success its row is opened in the ledger; on a refusal the caller
        still calls `settle`, which then writes no row."""
        tenant = admission.identity.tenant
        _check_caps(tenant, prompt_tokens, max_tokens)
        output = max_tokens if max_tokens_given else min(max_tokens, self.default_output_reservation_tokens)
        output *= admission.choices
        limits, charges = admission.limits, _charges(tenant, input_tokens=prompt_tokens, output_tokens=output)
        caps = Caps(tenant.max_concurrent, tenant.monthly_token_budget)
        try:
            decision = await limits.rates.acquire(tenant.id, charges)
            if not decision.allowed:
                raise limit_exceeded(decision.limit_name or "rate", decision.retry_after_s, "per-minute rate")
            if not await limits.quota.reserve(tenant.id, admission.request_id, admission.month,
                                              prompt_tokens + output, caps, self._used_tokens(tenant.id)):
                await limits.rates.refund(tenant.id, charges)
                raise _quota_refusal(tenant, "monthly_token_budget")
        except HerdError:
            raise
        except Exception as err:
            if limits is self.fallback:
                raise
            self._shared_failed(err)  # fail open: a request holding a slot goes on unchecked
        admission.prompt_tokens, admission.reserved_output, admission.reserved = prompt_tokens, output, True
        try:
            self.ledger.open(self._row(admission, completion=0, cached=0, status="admitted"))
        except Exception:  # the ledger keeps the row in memory; settle writes it
            log.exception("usage ledger: could not journal request %s as open", admission.request_id)

    async def settle(self, admission: Admission, *, completion_tokens: int, cached_tokens: int, status: str) -> None:
        """The request ended (any way): write its row (if it passed reserve), give back unused output tokens
        or charge the excess, and release its slot. Never raises; the slot is released whatever fails."""
        tenant, limits = admission.identity.tenant, admission.limits
        used = admission.prompt_tokens + completion_tokens if admission.reserved else 0
        try:
            if admission.reserved:
                self.ledger.record(self._row(admission, completion=completion_tokens, cached=cached_tokens,
                                             status=status))
                extra = completion_tokens - admission.reserved_output
                if extra:
                    charges = _charges(tenant, output_tokens=abs(extra))
                    await (limits.rates.take if extra > 0 else limits.rates.refund)(tenant.id, charges)
        except Exception as err:
            self._settle_failed(admission, limits, err)
        finally:
            for slot in _slot_ids(admission.request_id, admission.choices):
                try:  # the tokens used are counted once, with the request's own slot
                    await limits.quota.release(tenant.id, slot, admission.month,
                                               used if slot == admission.request_id else 0)
                except Exception as err:
                    self._settle_failed(admission, limits, err)

    async def admit(self, identity: Identity, model: str, request_id: str, prompt_tokens: int,
                    max_tokens: int) -> Admission:
        """`enter` then `reserve` (settled at once if reserve refuses): the gateway's path before `enter`."""
        admission = await self.enter(identity, model, request_id)
        try:
            await self.reserve(admission, prompt_tokens, max_tokens)
        except BaseException:
            await self.settle(admission, completion_tokens=0, cached_tokens=0, status="refused")
            raise
        return admission

    def _shared_up(self) -> bool:
        return self.limits is not self.fallback and time.monotonic() >= self._shared_down_until

    def _shared_failed(self, err: Exception) -> None:
        if time.monotonic() >= self._shared_down_until:
            log.warning("tenancy: the shared limits failed (%s: %s); this gateway enforces its own for %g s",
                        type(err).__name__, err, SHARED_RETRY_S)
        self._shared_down_until = time.monotonic() + SHARED_RETRY_S

    def _settle_failed(self, admission: Admission, limits: Limits, err: Exception) -> None:
        log.error("tenancy: settling request %s: %s: %s", admission.request_id, type(err).__name__, err)
        if limits is not self.fallback:
            self._shared_failed(err)

    def _used_tokens(self, tenant_id: str) -> UsedTokens:
        async def used() -> int:
            start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            return await self._database(self.store.tokens_used_since, tenant_id, start)

        return used

    async def _database(self, call: Callable[..., T], *args: object) -> T:
        """A store call off the event loop, bounded by database_timeout_s; any failure is a 503."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(call, *args), self.database_timeout_s)
        except Exception as err:
            raise database_unavailable() from err

    @staticmethod
    def _row(admission: Admission, *, completion: int, cached: int, status: str) -> dict[str, object]:
        return {
            "time": datetime.now(UTC), "tenant_id": admission.identity.tenant.id, "key_id": admission.identity.key_id,
            "model": admission.model, "request_id": admission.request_id, "prompt_tokens": admission.prompt_tokens,
            "completion_tokens": completion, "cached_tokens": cached, "status": status[:32],
            "latency_ms": int((time.monotonic() - admission.started) * 1000), "adapter": admission.adapter,
        }


def _check_caps(tenant: Tenant, prompt_tokens: int, max_tokens: int) -> None:
    if tenant.max_context is not None and prompt_tokens + max_tokens > tenant.max_context:
        raise context_limit(tenant.max_context, prompt_tokens + max_tokens)
    if tenant.max_output_tokens is not None and max_tokens > tenant.max_output_tokens:
        raise output_limit(tenant.max_output_tokens)


def _slot_ids(request_id: str, choices: int) -> list[str]:
    """The concurrency slots a request holds: its own id, and one more per further choice."""
    return [request_id, *(f"{request_id}#{i}" for i in range(1, choices))]


def _quota_refusal(tenant: Tenant, limit: str) -> HerdError:
    if limit == "max_concurrent":
        return limit_exceeded("max_concurrent", 1, f"{tenant.max_concurrent} requests at once")
    return limit_exceeded("monthly_token_budget", math.inf, "the monthly token budget is used up")


def _charges(tenant: Tenant, *, requests: int = 0, input_tokens: int = 0, output_tokens: int = 0) -> list[Charge]:
    """Charges against the tenant's per-minute limits that are set, for the amounts given (> 0)."""
    return [Charge(Limit(name, rate), amount)
            for name, rate, amount in (("requests_per_min", tenant.requests_per_min, requests),
                                       ("input_tokens_per_min", tenant.input_tokens_per_min, input_tokens),
                                       ("output_tokens_per_min", tenant.output_tokens_per_min, output_tokens))
            if rate and amount]


async def _quietly(call: Awaitable[None]) -> None:
    try:
        await call
    except Exception as err:
        log.warning("tenancy: undoing a slot failed (%s); its lease frees it", type(err).__name__)


def _month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


__all__ = ["ANONYMOUS", "SHARED_RETRY_S", "Admission", "Guard", "Limits"]
