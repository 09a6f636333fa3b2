"""The usage ledger writer: rows are batched to the database in the background and never lost on a
clean shutdown. While the database is down rows wait in memory (and the gateway refuses new requests,
since it cannot check keys); on shutdown whatever could not be written goes to a spill file, which
the next start writes back (rows are keyed by request id, so nothing is counted twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from herd.platform.tenancy.store import TenantStore

log = logging.getLogger(__name__)


class UsageLedger:
    def __init__(self, store: TenantStore, *, flush_interval_s: float = 0.5, max_batch: int = 500,
                 spill_path: Path | None = None) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.spill_path = spill_path
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()  # two flushes at once would each drop the other's batch
        self.database_ok = True

    def record(self, row: dict[str, Any]) -> None:
        """Queue one usage row (tenant_id, key_id, model, request_id, tokens, status, latency_ms, time)."""
        self._pending.append(row)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._recover_spill()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> bool:
        """Write everything queued; False (rows kept) when the database refuses."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        while self._pending:
            batch = self._pending[: self.max_batch]
            try:
                await asyncio.to_thread(self.store.record_usage, batch)
            except Exception as err:
                if self.database_ok:
                    log.error("usage ledger: database write failed, %d rows kept for retry: %s",
                              len(self._pending), type(err).__name__)
                self.database_ok = False
                return False
            del self._pending[: len(batch)]
            self.database_ok = True
        return True

    async def close(self) -> None:
        """Stop the writer, write what is left, spill to disk what the database would not take."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not await self.flush() and self._pending:
            self._spill()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()

    def _spill(self) -> None:
        if self.spill_path is None:
            log.error("usage ledger: %d rows could not be written and no spill file is set", len(self._pending))
            return
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spill_path.open("a") as out:
            for row in self._pending:
                out.write(json.dumps({**row, "time": row["time"].isoformat()}) + "\n")
        log.warning("usage ledger: database unavailable; %d rows spilled to %s", len(self._pending), self.spill_path)
        self._pending.clear()

    def _recover_spill(self) -> None:
        if self.spill_path is None or not self.spill_path.is_file():
            return
        rows = [json.loads(line) for line in self.spill_path.read_text().splitlines() if line.strip()]
        self._pending = [{**r, "time": datetime.fromisoformat(r["time"])} for r in rows] + self._pending
        self.spill_path.unlink()
        log.info("usage ledger: %d spilled rows queued again", len(rows))
