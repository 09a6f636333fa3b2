"""The usage ledger writer: rows are batched to the database in the background and never lost. While
the database is down rows wait in memory (and the gateway refuses new requests, since it cannot check
keys). Every row, and every admitted request before it ends, is also in the usage journal
(herd.platform.tenancy.journal, at `spill_path`) until the database has it; the next start writes
back what the journal holds, so neither a shutdown with the database down nor a killed gateway loses
a row (rows are keyed by request id, so nothing is counted twice). The writer also writes the API keys'
last uses that the store keeps in memory (TenantStore.flush_last_used), every LAST_USED_INTERVAL_S and on
close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from herd.platform.tenancy.journal import UsageJournal
from herd.platform.tenancy.store import TenantStore

log = logging.getLogger(__name__)
LAST_USED_INTERVAL_S = 5.0


class UsageLedger:
    def __init__(self, store: TenantStore, *, flush_interval_s: float = 0.5, max_batch: int = 500,
                 spill_path: Path | None = None, timeout_s: float = 5.0) -> None:
        self.store = store
        self.timeout_s = timeout_s  # one database write waited for at most this long (then retried: idempotent)
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.spill_path = spill_path
        self._pending: list[dict[str, Any]] = []
        self._open: dict[str, dict[str, Any]] = {}  # request id -> its row, for requests admitted, not ended
        self.journal = UsageJournal(spill_path) if spill_path is not None else None
        self._task: asyncio.Task[None] | None = None
        self._recover()  # before anything can rewrite the journal: an earlier run's rows are never dropped
        self._flushing = asyncio.Lock()  # two flushes at once would each drop the other's batch
        self.database_ok = True

    def open(self, row: dict[str, Any]) -> None:
        """A request was admitted: journal its row as it stands, in case this process dies before it ends."""
        self._open[row["request_id"]] = row
        if self.journal is not None:
            self._journaled(self.journal.opened, row)

    def record(self, row: dict[str, Any]) -> None:
        """Queue one usage row (tenant_id, key_id, model, request_id, tokens, status, latency_ms, time)."""
        self._open.pop(row["request_id"], None)
        self._pending.append(row)
        if self.journal is not None:
            self._journaled(self.journal.finished, row)

    def _journaled(self, write: Callable[[dict[str, Any]], None], row: dict[str, Any]) -> None:
        """Journal a row; a journal that cannot be written (disk full, volume gone) costs only the crash
        safety of that row: the row itself is in memory already and reaches the database with the rest."""
        try:
            write(row)
        except OSError as err:
            log.error("usage journal %s: could not write request %s (%s); it is kept in memory only",
                      self.spill_path, row["request_id"], err)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> bool:
        """Write everything queued; False (rows kept) when the database refuses."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        while self._pending:
            batch = self._pending[: self.max_batch]
            try:
                async with asyncio.timeout(self.timeout_s):  # not wait_for: on 3.11 it can swallow close()'s cancel
                    await asyncio.to_thread(self.store.record_usage, batch)
            except Exception as err:
                if self.database_ok:
                    log.error("usage ledger: database write failed, %d rows kept for retry: %s",
                              len(self._pending), type(err).__name__)
                self.database_ok = False
                return False
            del self._pending[: len(batch)]
            self.database_ok = True
            self._compact()
        return True

    def _compact(self) -> None:
        if self.journal is not None:
            self.journal.compact(self._pending, self._open.values())

    async def close(self) -> None:
        """Stop the writer, write what is left, spill to disk what the database would not take."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not await self.flush() and self._pending:
            self._spill()
        if self.journal is not None:
            self.journal.close()
        await self.flush_last_used()

    async def flush_last_used(self) -> None:
        """Write the keys' last uses; on a failure they wait for the next time."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await asyncio.to_thread(self.store.flush_last_used)
        except Exception as err:
            log.warning("usage ledger: could not write API keys' last use (%s); kept for the next try",
                        type(err).__name__)

    async def _run(self) -> None:
        last_used_at = time.monotonic()
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()
            if time.monotonic() - last_used_at >= LAST_USED_INTERVAL_S:
                last_used_at = time.monotonic()
                await self.flush_last_used()

    def _spill(self) -> None:
        if self.journal is None:
            log.error("usage ledger: %d rows could not be written and no spill file is set", len(self._pending))
            return
        self._compact()  # the journal keeps them (and any request still open) for the next start
        log.warning("usage ledger: database unavailable; %d rows kept in %s", len(self._pending), self.spill_path)
        self._pending.clear()

    def _recover(self) -> None:
        if self.journal is None:
            return
        rows = self.journal.recover()
        if rows:
            self._pending = rows + self._pending
            self._compact()
            interrupted = sum(r["status"] == "interrupted" for r in rows)
            log.info("usage ledger: %d rows from the journal queued again (%d of requests interrupted)",
                     len(rows), interrupted)
