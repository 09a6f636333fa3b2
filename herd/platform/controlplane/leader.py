"""Leader election with a Kubernetes Lease, so two control-plane pods never act at once.

`lease_action` is the pure decision; `LeaseElector` applies it through the official client.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kubernetes import client as k8s

Action = Literal["create", "renew", "take", "wait"]


def lease_action(spec: dict[str, Any] | None, identity: str, now: datetime) -> Action:
    """What to do with the lease as it stands: make it, renew our hold, take an expired one, or wait."""
    if spec is None:
        return "create"
    holder = spec.get("holderIdentity")
    if holder == identity:
        return "renew"
    renewed = spec.get("renewTime") or spec.get("acquireTime")
    duration = spec.get("leaseDurationSeconds") or 15
    if not holder or renewed is None or _parse(renewed) + timedelta(seconds=duration) <= now:
        return "take"
    return "wait"


class LeaseElector:
    """Holds coordination.k8s.io/v1 Lease `name` for `identity` while it keeps renewing."""

    def __init__(self, api: k8s.CoordinationV1Api, namespace: str, name: str, identity: str, *,
                 duration_s: int = 15) -> None:
        self.api = api
        self.namespace, self.name, self.identity, self.duration_s = namespace, name, identity, duration_s

    def try_lead(self, now: datetime | None = None) -> bool:
        """Create, renew or take the lease when that is ours to do; True while we hold it."""
        from kubernetes.client import V1Lease
        from kubernetes.client.exceptions import ApiException

        now = now or datetime.now(UTC)
        spec: dict[str, Any] | None
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            # A Lease without a spec has no holder: it is there to be taken.
            spec = {_camel(k): v for k, v in lease.spec.to_dict().items()} if lease.spec is not None else {}
        except ApiException as err:
            if err.status != 404:
                raise
            spec = None
        action = lease_action(spec, self.identity, now)
        if action == "wait":
            return False
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                "metadata": {"name": self.name, "namespace": self.namespace},
                                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration_s,
                                         "renewTime": stamp}}
        if action == "create":
            body["spec"].update(acquireTime=stamp, leaseTransitions=0)
            self.api.create_namespaced_lease(self.namespace, V1Lease.model_validate(body))
        elif action == "take":
            body["spec"].update(acquireTime=stamp, leaseTransitions=int((spec or {}).get("leaseTransitions") or 0) + 1)
            self.api.patch_namespaced_lease(self.name, self.namespace, body)
        else:
            self.api.patch_namespaced_lease(self.name, self.namespace, {"spec": {"renewTime": stamp}})
        return True


def _parse(stamp: object) -> datetime:
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
