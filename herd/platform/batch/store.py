"""The Files and Batch APIs' rows in the tenancy database (StoredFile, BatchJob, BatchItem). Synchronous
SQLAlchemy; callers run it off the event loop.

Every read a door makes is scoped to the caller's tenant: another tenant's file or batch is simply not found.
A line's result, its status and its batch's counters change in one transaction, and only while the line is
pending: a line finished twice (two attempts racing after a restart) keeps its first result.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, and_, func, or_, select, update

from herd.platform.tenancy.database import sessions
from herd.platform.tenancy.schema import BatchItem, BatchJob, StoredFile

OPEN = ("validating", "in_progress", "finalizing", "cancelling")
"""Batch statuses the runner still has work for."""
FINAL = ("completed", "failed", "expired", "cancelled")


class BatchStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session = sessions(engine)

    # --- files ----------------------------------------------------------------------------------
    def add_file(self, file: StoredFile) -> StoredFile:
        """Insert (or, for an output file written again after a crash, replace) a file's metadata."""
        with self.session.begin() as s:
            return s.merge(file)

    def file(self, tenant_id: str, file_id: str) -> StoredFile | None:
        with self.session() as s:
            found = s.get(StoredFile, file_id)
        return found if found is not None and found.tenant_id == tenant_id else None

    def files(self, tenant_id: str, *, purpose: str | None, limit: int, after: str | None) -> list[StoredFile]:
        """The tenant's files, newest first, from just after the file `after`."""
        query = select(StoredFile).where(StoredFile.tenant_id == tenant_id)
        if purpose is not None:
            query = query.where(StoredFile.purpose == purpose)
        with self.session() as s:
            if after is not None:
                cursor = s.get(StoredFile, after)
                if cursor is None or cursor.tenant_id != tenant_id:
                    return []
                query = query.where(_before(StoredFile, cursor.created_at, cursor.id))
            return list(s.scalars(query.order_by(StoredFile.created_at.desc(), StoredFile.id.desc()).limit(limit)))

    def delete_file(self, tenant_id: str, file_id: str) -> StoredFile | None:
        with self.session.begin() as s:
            found = s.get(StoredFile, file_id)
            if found is None or found.tenant_id != tenant_id:
                return None
            s.delete(found)
        return found

    # --- batches --------------------------------------------------------------------------------
    def queued_lines(self, tenant_id: str) -> int:
        """Lines waiting in the tenant's open batches."""
        with self.session() as s:
            count = s.scalar(select(func.count()).select_from(BatchItem).join(BatchJob)
                             .where(BatchJob.tenant_id == tenant_id, BatchJob.status.in_(("validating", "in_progress")),
                                    BatchItem.status == "pending"))
        return int(count or 0)

    def create_batch(self, job: BatchJob, items: Sequence[BatchItem]) -> BatchJob:
        """The batch and every one of its lines, pending, in one transaction."""
        with self.session.begin() as s:
            s.add(job)
            s.flush()  # the lines' foreign key needs the batch first (the ORM has no relationship to order them)
            s.add_all(items)
        return job

    def batch(self, tenant_id: str | None, batch_id: str) -> BatchJob | None:
        """A batch of `tenant_id` (any tenant's: None)."""
        with self.session() as s:
            found = s.get(BatchJob, batch_id)
        return found if found is not None and tenant_id in (None, found.tenant_id) else None

    def batches(self, tenant_id: str, *, limit: int, after: str | None) -> list[BatchJob]:
        query = select(BatchJob).where(BatchJob.tenant_id == tenant_id)
        with self.session() as s:
            if after is not None:
                cursor = s.get(BatchJob, after)
                if cursor is None or cursor.tenant_id != tenant_id:
                    return []
                query = query.where(_before(BatchJob, cursor.created_at, cursor.id))
            return list(s.scalars(query.order_by(BatchJob.created_at.desc(), BatchJob.id.desc()).limit(limit)))

    def open_batches(self) -> list[BatchJob]:
        """Every batch with work left, oldest first (the runner's round)."""
        with self.session() as s:
            return list(s.scalars(select(BatchJob).where(BatchJob.status.in_(OPEN))
                                  .order_by(BatchJob.created_at, BatchJob.id)))

    def request_cancel(self, tenant_id: str, batch_id: str, now: datetime) -> BatchJob | None:
        """Mark an open batch cancelling (the runner finishes the cancel); a final one is returned unchanged."""
        with self.session.begin() as s:
            job = s.get(BatchJob, batch_id)
            if job is None or job.tenant_id != tenant_id:
                return None
            if job.status in ("validating", "in_progress"):
                job.status, job.cancelling_at = "cancelling", now
        return job

    def set_status(self, batch_id: str, status: str, **fields: Any) -> BatchJob:
        with self.session.begin() as s:
            job = s.get(BatchJob, batch_id)
            if job is None:
                raise LookupError(f"no batch {batch_id!r}")
            job.status = status
            for name, value in fields.items():
                setattr(job, name, value)
        return job

    # --- lines ----------------------------------------------------------------------------------
    def pending_lines(self, batch_id: str, *, limit: int, skip: Sequence[int] = ()) -> list[BatchItem]:
        query = select(BatchItem).where(BatchItem.batch_id == batch_id, BatchItem.status == "pending")
        if skip:
            query = query.where(BatchItem.line.not_in(list(skip)))
        with self.session() as s:
            return list(s.scalars(query.order_by(BatchItem.line).limit(limit)))

    def pending_count(self, batch_id: str) -> int:
        with self.session() as s:
            count = s.scalar(select(func.count()).select_from(BatchItem)
                             .where(BatchItem.batch_id == batch_id, BatchItem.status == "pending"))
        return int(count or 0)

    def finish_line(self, batch_id: str, line: int, status: str, result: dict[str, Any], now: datetime) -> bool:
        """A pending line's result and status (completed or failed), and its batch's count, in one transaction.
        False when the line was no longer pending (its first result stands)."""
        if status not in ("completed", "failed"):
            raise ValueError(f"a finished line is completed or failed, not {status!r}")
        with self.session.begin() as s:
            changed = cast(CursorResult[Any], s.execute(update(BatchItem)
                                .where(BatchItem.batch_id == batch_id, BatchItem.line == line,
                                       BatchItem.status == "pending")
                                .values(status=status, result=result, updated_at=now))).rowcount
            if changed:
                column = BatchJob.completed if status == "completed" else BatchJob.failed
                s.execute(update(BatchJob).where(BatchJob.id == batch_id).values({column: column + 1}))
        return bool(changed)

    def finished_lines(self, batch_id: str) -> list[BatchItem]:
        with self.session() as s:
            return list(s.scalars(select(BatchItem).where(BatchItem.batch_id == batch_id,
                                                          BatchItem.status != "pending").order_by(BatchItem.line)))


def _before(table: type[StoredFile] | type[BatchJob], created_at: datetime, row_id: str) -> Any:
    """Rows after the cursor in newest-first order."""
    return or_(table.created_at < created_at, and_(table.created_at == created_at, table.id < row_id))


def aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without a zone; they were stored in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


__all__ = ["FINAL", "OPEN", "BatchStore", "aware"]
