"""The Files and Batch APIs' operations for one tenant, whatever door asks: upload, read and delete files;
create, read, list and cancel batches. Refusals are HerdErrors; another tenant's file or batch is not found
(404), never forbidden.

A batch is checked whole when it is made (its input file's every line, the tenant's queue limit) and then
exists in the database with every line pending: from there on it is the runner's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from herd.engine.errors import HerdError
from herd.platform.batch.file_store import FileStore
from herd.platform.batch.input_lines import ENDPOINTS, parse_input, window_s
from herd.platform.batch.store import BatchStore
from herd.platform.gateway.errors import file_too_large, invalid_request, limit_exceeded, not_found
from herd.platform.tenancy.schema import BatchItem, BatchJob, StoredFile

UPLOAD_PURPOSES = ("batch",)
ANONYMOUS = "anonymous"  # the tenant of every caller when the gateway runs without API keys


@dataclass(frozen=True)
class BatchLimits:
    max_file_bytes: int = 16 * 2**20  # one uploaded file
    max_queued_lines: int = 50_000  # pending lines of one tenant's open batches


def tenant_of(identity: Any) -> str:
    """The caller's tenant id (the guard's identity; None without tenancy)."""
    return ANONYMOUS if identity is None else str(identity.tenant.id)


class Batches:
    def __init__(self, store: BatchStore, files: FileStore, *, limits: BatchLimits | None = None,
                 endpoints: tuple[str, ...] = ENDPOINTS, on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        """`on_change`: told when a batch is made or cancelled (the runner's wake)."""
        self.store, self.files = store, files
        self.limits = limits or BatchLimits()
        self.endpoints = endpoints
        self.on_change = on_change
        self.clock = clock

    # --- files ----------------------------------------------------------------------------------
    async def upload(self, tenant: str, *, filename: str, purpose: str, data: bytes) -> StoredFile:
        if purpose not in UPLOAD_PURPOSES:
            raise invalid_request(f"purpose must be one of {list(UPLOAD_PURPOSES)}, got {purpose!r}", param="purpose")
        if len(data) > self.limits.max_file_bytes:
            raise file_too_large(len(data), self.limits.max_file_bytes)
        file_id = f"file-{uuid.uuid4().hex}"
        await self.files.put(file_id, data)
        record = StoredFile(id=file_id, tenant_id=tenant, purpose=purpose, filename=filename[:255] or "upload.jsonl",
                            bytes=len(data), storage_key=file_id, created_at=self.clock())
        return await asyncio.to_thread(self.store.add_file, record)

    async def file(self, tenant: str, file_id: str) -> StoredFile:
        found = await asyncio.to_thread(self.store.file, tenant, file_id)
        if found is None:
            raise not_found(f"No such file: {file_id!r}")
        return found

    async def content(self, tenant: str, file_id: str) -> bytes:
        return await self.files.get((await self.file(tenant, file_id)).storage_key)

    async def delete_file(self, tenant: str, file_id: str) -> StoredFile:
        found = await asyncio.to_thread(self.store.delete_file, tenant, file_id)
        if found is None:
            raise not_found(f"No such file: {file_id!r}")
        await self.files.delete(found.storage_key)
        return found

    async def list_files(self, tenant: str, *, purpose: str | None, limit: int, after: str | None) -> list[StoredFile]:
        return await asyncio.to_thread(self.store.files, tenant, purpose=purpose, limit=limit, after=after)

    # --- batches --------------------------------------------------------------------------------
    async def create(self, tenant: str, *, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None) -> BatchJob:
        if endpoint not in self.endpoints:
            raise invalid_request(f"endpoint must be one of {list(self.endpoints)}, got {endpoint!r}",
                                  param="endpoint")
        window = window_s(completion_window)
        source = await asyncio.to_thread(self.store.file, tenant, input_file_id)
        if source is None:
            raise not_found(f"No such file: {input_file_id!r}")
        if source.purpose != "batch":
            raise invalid_request(f"file {input_file_id!r} has purpose {source.purpose!r}, not 'batch'",
                                  param="input_file_id")
        lines = parse_input(await self.files.get(source.storage_key), endpoint)
        queued = await asyncio.to_thread(self.store.queued_lines, tenant)
        if queued + len(lines) > self.limits.max_queued_lines:
            raise limit_exceeded("max_queued_lines", 60, f"{queued} requests are queued in open batches and this "
                                 f"batch has {len(lines)}; at most {self.limits.max_queued_lines} may be queued")
        now = self.clock()
        batch_id = f"batch_{uuid.uuid4().hex}"
        job = BatchJob(id=batch_id, tenant_id=tenant, endpoint=endpoint, input_file_id=input_file_id,
                       completion_window=completion_window, status="in_progress", total=len(lines), completed=0,
                       failed=0, metadata_=metadata, created_at=now, in_progress_at=now,
                       expires_at=now + timedelta(seconds=window))
        items = [BatchItem(batch_id=batch_id, line=line.index, custom_id=line.custom_id, status="pending",
                           request=line.body, updated_at=now) for line in lines]
        await asyncio.to_thread(self.store.create_batch, job, items)
        self.on_change()
        return job

    async def batch(self, tenant: str, batch_id: str) -> BatchJob:
        found = await asyncio.to_thread(self.store.batch, tenant, batch_id)
        if found is None:
            raise not_found(f"No such batch: {batch_id!r}")
        return found

    async def cancel(self, tenant: str, batch_id: str) -> BatchJob:
        found = await asyncio.to_thread(self.store.request_cancel, tenant, batch_id, self.clock())
        if found is None:
            raise not_found(f"No such batch: {batch_id!r}")
        self.on_change()
        return found

    async def list_batches(self, tenant: str, *, limit: int, after: str | None) -> list[BatchJob]:
        return await asyncio.to_thread(self.store.batches, tenant, limit=limit, after=after)


__all__ = ["ANONYMOUS", "BatchLimits", "Batches", "HerdError", "tenant_of"]
