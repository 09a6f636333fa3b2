"""Weighted fair share between tenants, by tokens: whoever has been served least, per unit of weight,
goes next.

Each tenant has a virtual time: the tokens scheduled for it divided by its weight. The scheduler
serves the tenant with the smallest virtual time first, so a tenant sending huge prompts advances its
clock fast and yields to others, while within a tenant requests keep their arrival order. A tenant
that returns after being idle starts at the smallest virtual time among busy tenants, not at its old
one: idling banks no credit to burst with later (start-time fair queuing). Pure arithmetic.
"""

from __future__ import annotations


class FairShare:
    """Virtual time per tenant."""

    def __init__(self) -> None:
        self._virtual: dict[str, float] = {}

    def activate(self, tenant: str, busy: set[str]) -> None:
        """A tenant with no requests gets one: start it level with the least-served busy tenant."""
        floor = min((self._virtual.get(t, 0.0) for t in busy if t != tenant), default=None)
        current = self._virtual.get(tenant, 0.0)
        self._virtual[tenant] = current if floor is None else max(current, floor)

    def charge(self, tenant: str, tokens: int, weight: float) -> None:
        self._virtual[tenant] = self._virtual.get(tenant, 0.0) + tokens / weight

    def virtual_time(self, tenant: str) -> float:
        return self._virtual.get(tenant, 0.0)
