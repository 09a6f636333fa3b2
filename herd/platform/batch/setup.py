"""The Files and Batch APIs of a gateway process: their store on the tenancy database, the local file
directory, and the runner, made from settings (herd serve and herd gateway call this)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from herd.platform.batch.file_store import LocalFileStore
from herd.platform.batch.runner import BatchRunner, RunnerSettings
from herd.platform.batch.runner_lock import RunnerLock
from herd.platform.batch.service import Batches, BatchLimits
from herd.platform.batch.store import BatchStore
from herd.platform.settings import BatchSettings
from herd.platform.tenancy.store import Identity, TenantStore


@dataclass(frozen=True)
class BatchApis:
    batches: Batches  # what the door serves
    runner: BatchRunner  # started here; stopped by stop_doors after the gateway drained


def start_batches(settings: BatchSettings, tenants: TenantStore, gateway: Any) -> BatchApis:
    """The door's operations and a started runner (call on the event loop). A batch's lines run with its
    tenant's current settings (limits, weight), under no key (the ledger's key_id is empty for them)."""
    store = BatchStore(tenants.engine)
    files = LocalFileStore(settings.file_dir)

    def identity_of(tenant_id: str) -> Identity:
        return Identity(tenant=tenants.get_tenant(tenant_id), key_id=None)

    runner = BatchRunner(store, files, gateway, identity_of, settings=RunnerSettings(
        max_in_flight=settings.max_in_flight, weight_factor=settings.weight_factor,
        poll_interval_s=settings.poll_interval_s), lock=RunnerLock(tenants.engine))
    batches = Batches(store, files, limits=BatchLimits(max_file_bytes=settings.max_file_bytes,
                                                       max_queued_lines=settings.max_queued_lines),
                      on_change=runner.wake)
    runner.start()
    return BatchApis(batches, runner)


__all__ = ["BatchApis", "start_batches"]
