"""The batch runner: a background task of the gateway process that runs open batches' pending lines.

Invariant: a line is pending until its result is committed (with its status, in one transaction); nothing
else records that a line ran. So a runner that stops anywhere (a crash, a restart) leaves only pending lines to
redo, and the next runner on the same database redoes exactly those, under the same request ids (the ledger
keeps one row per request id). Each round, for every open batch, oldest first:
  in_progress past its window  -> in-flight lines aborted, pending lines get batch_expired error lines -> expired
  cancelling                   -> no new lines; once none of its lines is in flight -> cancelled
  in_progress                  -> pending lines started, at most max_in_flight lines in all and an equal share
                                  of them per in-progress batch (one tenant's big batch does not hold them all)
  finalizing, or nothing left  -> output and error files written -> completed
A line refused for now (429, 503) stays pending and its batch waits retry_s before starting more lines.
Of several gateways on one database, only the one holding the RunnerLock runs rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from herd.platform.batch.file_store import FileStore
from herd.platform.batch.line_request import run_line
from herd.platform.batch.output_lines import expired_line, jsonl
from herd.platform.batch.runner_lock import RunnerLock
from herd.platform.batch.store import BatchStore, aware
from herd.platform.gateway.core import Gateway
from herd.platform.tenancy.schema import BatchItem, BatchJob, StoredFile

log = logging.getLogger(__name__)
RunLine = Callable[..., Awaitable[tuple[str, dict[str, Any]] | None]]


@dataclass(frozen=True)
class RunnerSettings:
    max_in_flight: int = 4  # lines running at once, every batch together
    weight_factor: float = 0.1  # the batch class's share of its tenant's fair-share weight
    poll_interval_s: float = 1.0  # a round at least this often (resumed, expiring, other gateways' batches)
    retry_s: float = 1.0  # a batch whose line was refused for now starts no line for this long


class BatchRunner:
    def __init__(self, store: BatchStore, files: FileStore, gateway: Gateway, identity_of: Callable[[str], Any], *,
                 settings: RunnerSettings | None = None, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 run: RunLine = run_line, lock: RunnerLock | None = None) -> None:
        """`identity_of(tenant_id)`: the tenant's identity as the gateway's guard takes it (blocking: run in a
        thread; None without tenancy). `lock`: rounds run only while it is held (one runner per database)."""
        self.store, self.files, self.gateway, self.identity_of = store, files, gateway, identity_of
        self.settings = settings or RunnerSettings()
        self.clock = clock
        self._run = run
        self.lock = lock
        self._in_flight: dict[tuple[str, int], asyncio.Task[None]] = {}  # (batch, line) -> its task
        self._waiting_until: dict[str, datetime] = {}  # batch -> no new lines before
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._share = self.settings.max_in_flight  # lines one batch may have in flight (this round's fair share)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-runner")

    def wake(self) -> None:
        """A batch was made or cancelled here: a round now, not at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop the rounds and abort the lines in flight (they stay pending, for the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._abort(list(self._in_flight))
        if self.lock is not None:
            await asyncio.to_thread(self.lock.release)

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self.lock is None or await asyncio.to_thread(self.lock.held):
                    await self.round()
            except Exception:  # the database away for a moment: try again at the next poll
                log.exception("batch runner: a round failed")
            with contextlib.suppress(TimeoutError):  # not wait_for: on 3.11 it can swallow stop()'s cancel
                async with asyncio.timeout(self.settings.poll_interval_s):
                    await self._wake.wait()

    async def round(self) -> None:
        """One pass over the open batches (see the module's doc)."""
        jobs = await asyncio.to_thread(self.store.open_batches)
        running = sum(job.status == "in_progress" for job in jobs)
        self._share = max(1, -(-self.settings.max_in_flight // max(running, 1)))  # ceil: every batch gets slots
        for job in jobs:
            try:
                await self._step(job, self.clock())
            except Exception:  # this batch's trouble (its tenant deleted, a file store error) holds up no other
                log.exception("batch runner: batch %s", job.id)

    async def _step(self, job: BatchJob, now: datetime) -> None:
        if job.status == "in_progress" and job.expires_at is not None and now >= aware(job.expires_at):
            await self._expire(job)
        elif job.status == "cancelling":
            if not self._lines_of(job.id):
                await self._finalize(job, "cancelled")
        elif job.status == "finalizing":
            await self._finalize(job, "completed")
        elif job.status == "in_progress":
            await self._advance(job, now)

    async def idle(self) -> None:
        """Until no line is in flight (tests)."""
        while self._in_flight:
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    def _lines_of(self, batch_id: str) -> list[tuple[str, int]]:
        return [key for key in self._in_flight if key[0] == batch_id]

    async def _advance(self, job: BatchJob, now: datetime) -> None:
        running = self._lines_of(job.id)
        if now < self._waiting_until.get(job.id, now):
            return
        room = min(self.settings.max_in_flight - len(self._in_flight), self._share - len(running))
        lines = await asyncio.to_thread(self.store.pending_lines, job.id, limit=max(room, 0),
                                        skip=[line for _, line in running]) if room > 0 else []
        if lines:
            identity = await asyncio.to_thread(self.identity_of, job.tenant_id)
            for item in lines:
                self._in_flight[(job.id, item.line)] = asyncio.create_task(self._line(job, item, identity))
        elif not running and await asyncio.to_thread(self.store.pending_count, job.id) == 0:
            await self._finalize(job, "completed")

    async def _line(self, job: BatchJob, item: BatchItem, identity: Any) -> None:
        try:
            outcome = await self._run(self.gateway, identity, batch_id=job.id, endpoint=job.endpoint, index=item.line,
                                      custom_id=item.custom_id, body=item.request,
                                      weight_factor=self.settings.weight_factor)
            if outcome is None:
                self._waiting_until[job.id] = self.clock() + timedelta(seconds=self.settings.retry_s)
            else:
                status, line = outcome
                await asyncio.to_thread(self.store.finish_line, job.id, item.line, status, line, self.clock())
        except asyncio.CancelledError:
            raise
        except Exception:  # the line stays pending and runs again
            log.exception("batch %s: line %d could not be recorded", job.id, item.line)
        finally:
            self._in_flight.pop((job.id, item.line), None)
            self._wake.set()

    async def _abort(self, keys: list[tuple[str, int]]) -> None:
        tasks = [self._in_flight[key] for key in keys if key in self._in_flight]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _expire(self, job: BatchJob) -> None:
        await self._abort(self._lines_of(job.id))
        now = self.clock()
        while pending := await asyncio.to_thread(self.store.pending_lines, job.id, limit=500):
            for item in pending:
                await asyncio.to_thread(self.store.finish_line, job.id, item.line, "failed",
                                        expired_line(job.id, item.line, item.custom_id), now)
        await self._finalize(job, "expired")

    async def _finalize(self, job: BatchJob, status: str) -> None:
        """Write the output and error files of the finished lines, then the batch's final status."""
        now = self.clock()
        if job.status != "finalizing" and status == "completed":
            await asyncio.to_thread(self.store.set_status, job.id, "finalizing", finalizing_at=now)
        finished = await asyncio.to_thread(self.store.finished_lines, job.id)
        outputs = [i.result for i in finished if i.status == "completed" and i.result is not None]
        errors = [i.result for i in finished if i.status == "failed" and i.result is not None]
        output_id = await self._write(job, "output", outputs, now)
        error_id = await self._write(job, "error", errors, now)
        await asyncio.to_thread(self.store.set_status, job.id, status, output_file_id=output_id,
                                error_file_id=error_id, **{f"{status}_at": now})
        self._waiting_until.pop(job.id, None)
        log.info("batch %s: %s (%d output lines, %d error lines)", job.id, status, len(outputs), len(errors))

    async def _write(self, job: BatchJob, kind: str, lines: list[dict[str, Any]], now: datetime) -> str | None:
        """An output (or error) file of `lines`, under an id the batch determines (written again, not twice,
        when a finalize is redone after a crash); None when there are no lines."""
        if not lines:
            return None
        file_id = f"file-{kind}-{job.id.removeprefix('batch_')}"
        data = jsonl(lines)
        key = f"{file_id}-{uuid.uuid4().hex[:8]}"
        await self.files.put(key, data)
        await asyncio.to_thread(self.store.add_file, StoredFile(
            id=file_id, tenant_id=job.tenant_id, purpose="batch_output", filename=f"batch_{kind}.jsonl",
            bytes=len(data), storage_key=key, created_at=now))
        return file_id


__all__ = ["BatchRunner", "RunnerSettings"]
