"""Admission by tenant: who is calling, what they may use, and whether their limits allow it now.

Order, for every request on either door: key -> tenant (401), model allowed (403), per-tenant context
and output caps (400), then concurrency, monthly budget and per-minute rates (429, naming the limit;
all refused before any compute). Output tokens are reserved from max_tokens at admission and the
unused part is given back when the request ends; the usage row is written whatever the outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from herd.engine.errors import HerdError
from herd.platform.gateway.errors import (
    context_limit,
    database_unavailable,
    limit_exceeded,
    output_limit,
    permission_denied,
    unauthenticated,
)
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import Charge, Limit, RateLimiter
from herd.platform.tenancy.schema import Tenant
from herd.platform.tenancy.store import Identity, TenantStore
from herd.protos.herd.v1 import inference_pb2 as pb

ANONYMOUS = Tenant(id="anonymous", name="anonymous", allowed_models=["*"], weight=1.0, priority_class="standard",
                   disabled=False)


@dataclass
class Admission:
    """A request that passed admission: what it reserved, to settle when it ends."""

    identity: Identity
    model: str
    request_id: str
    prompt_tokens: int
    reserved_output: int
    started: float = field(default_factory=time.monotonic)


class Guard:
    def __init__(self, store: TenantStore, limiter: RateLimiter, ledger: UsageLedger, *, auth: bool = True) -> None:
        self.store = store
        self.limiter = limiter
        self.ledger = ledger
        self.auth = auth
        self._in_flight: dict[str, int] = defaultdict(int)
        self._month_tokens: dict[str, tuple[str, int]] = {}  # tenant -> (YYYY-MM, tokens counted)

    async def authenticate(self, credential: str | None) -> Identity:
        if not self.auth:
            return Identity(tenant=ANONYMOUS, key_id=None)
        if not credential:
            raise unauthenticated("Missing API key: send 'Authorization: Bearer <key>'.")
        try:
            identity = await asyncio.to_thread(self.store.authenticate, credential)
        except Exception as err:
            raise database_unavailable() from err
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

    def context(self, identity: Identity) -> pb.TenantContext:
        tenant = identity.tenant
        return pb.TenantContext(tenant_id=tenant.id, weight=tenant.weight or 1.0,
                                sharing_group=tenant.sharing_group or "")

    async def admit(self, identity: Identity, model: str, request_id: str, prompt_tokens: int,
                    max_tokens: int) -> Admission:
        tenant = identity.tenant
        admission = Admission(identity, model, request_id, prompt_tokens, max_tokens)
        try:
            self._check_caps(tenant, prompt_tokens, max_tokens)
            if tenant.max_concurrent is not None and self._in_flight[tenant.id] >= tenant.max_concurrent:
                raise limit_exceeded("max_concurrent", 1, f"{tenant.max_concurrent} requests at once")
            await self._check_budget(tenant, prompt_tokens + max_tokens)
            decision = await self.limiter.acquire(tenant.id, self._charges(tenant, prompt_tokens, max_tokens))
            if not decision.allowed:
                raise limit_exceeded(decision.limit_name or "rate", decision.retry_after_s, "per-minute rate")
        except HerdError as err:  # refused before any compute: recorded, billed nothing
            self._write(admission, completion=0, cached=0, status=f"refused:{err.reason or err.code.value}", prompt=0)
            raise
        self._in_flight[tenant.id] += 1
        self.ledger.open(self._row(admission, completion=0, cached=0, status="admitted"))
        return admission

    async def settle(self, admission: Admission, *, completion_tokens: int, cached_tokens: int, status: str) -> None:
        """The request ended (any way): release its slot, give back unused output tokens, write its row."""
        tenant = admission.identity.tenant
        self._in_flight[tenant.id] -= 1
        unused = admission.reserved_output - completion_tokens
        if unused > 0 and tenant.output_tokens_per_min:
            await self.limiter.refund(tenant.id, [Charge(Limit("output_tokens_per_min", tenant.output_tokens_per_min),
                                                         unused)])
        month, counted = self._month_tokens.get(tenant.id, (_month(), 0))
        self._month_tokens[tenant.id] = (month, counted + admission.prompt_tokens + completion_tokens)
        self._write(admission, completion=completion_tokens, cached=cached_tokens, status=status)

    def _write(
        self, admission: Admission, *, completion: int, cached: int, status: str, prompt: int | None = None
    ) -> None:
        self.ledger.record(self._row(admission, completion=completion, cached=cached, status=status, prompt=prompt))

    @staticmethod
    def _row(admission: Admission, *, completion: int, cached: int, status: str, prompt: int | None = None,
             ) -> dict[str, object]:
        return {
            "time": datetime.now(UTC), "tenant_id": admission.identity.tenant.id, "key_id": admission.identity.key_id,
            "model": admission.model, "request_id": admission.request_id,
            "prompt_tokens": admission.prompt_tokens if prompt is None else prompt,
            "completion_tokens": completion, "cached_tokens": cached, "status": status[:32],
            "latency_ms": int((time.monotonic() - admission.started) * 1000),
        }

    def _check_caps(self, tenant: Tenant, prompt_tokens: int, max_tokens: int) -> None:
        if tenant.max_context is not None and prompt_tokens + max_tokens > tenant.max_context:
            raise context_limit(tenant.max_context, prompt_tokens + max_tokens)
        if tenant.max_output_tokens is not None and max_tokens > tenant.max_output_tokens:
            raise output_limit(tenant.max_output_tokens)

    async def _check_budget(self, tenant: Tenant, tokens: int) -> None:
        if tenant.monthly_token_budget is None:
            return
        month, counted = self._month_tokens.get(tenant.id, ("", 0))
        if month != _month():
            start = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            try:
                counted = await asyncio.to_thread(self.store.tokens_used_since, tenant.id, start)
            except Exception as err:
                raise database_unavailable() from err
            self._month_tokens[tenant.id] = (_month(), counted)
        if counted + tokens > tenant.monthly_token_budget:
            raise limit_exceeded("monthly_token_budget", float("inf"), "the monthly token budget is used up")

    @staticmethod
    def _charges(tenant: Tenant, prompt_tokens: int, max_tokens: int) -> list[Charge]:
        charges = []
        for name, rate, amount in (("requests_per_min", tenant.requests_per_min, 1),
                                   ("input_tokens_per_min", tenant.input_tokens_per_min, prompt_tokens),
                                   ("output_tokens_per_min", tenant.output_tokens_per_min, max_tokens)):
            if rate:
                charges.append(Charge(Limit(name, rate), amount))
        return charges


def _month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


__all__ = ["ANONYMOUS", "Admission", "Guard"]
