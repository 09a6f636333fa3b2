"""The usage journal: an append-only file of the ledger's rows not yet in the database and of the
requests still in flight, so a gateway that is killed (SIGKILL, OOM, a node gone) loses no usage.

Each line is one JSON object: a finished request's usage row, or the same row marked `"open": true`,
written when a request is admitted. A write reaches the kernel before the request goes on, so it
survives the process (not the machine: there is no fsync per request). The ledger rewrites the file
with only what is still needed after each flush. On the next start `recover` returns every row the
file holds, and for a request that was opened and never finished a row with status "interrupted": its
prompt tokens, and no completion tokens (the tokens it streamed before the kill are not known).
Rows are keyed by request id in the database, so a row written twice counts once. The file (and the
directory Herd makes for it) is owner-only: it names tenants, keys and their usage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from herd.platform.tenancy.files import open_private

INTERRUPTED = "interrupted"


class UsageJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._out: TextIO | None = None

    def opened(self, row: dict[str, Any]) -> None:
        """A request was admitted: its row as it would read if the gateway died now."""
        self._append({**row, "open": True})

    def finished(self, row: dict[str, Any]) -> None:
        self._append(row)

    def compact(self, rows: Iterable[dict[str, Any]], open_rows: Iterable[dict[str, Any]]) -> None:
        """Replace the file by what is still needed (atomically); remove it when nothing is."""
        self._close()
        lines = [_line(r) for r in rows] + [_line({**r, "open": True}) for r in open_rows]
        if not lines:
            self.path.unlink(missing_ok=True)
            return
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        temporary.unlink(missing_ok=True)  # one a crash left keeps its mode if reopened: made anew, owner-only
        with os.fdopen(open_private(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as out:
            out.write("".join(lines))
        os.replace(temporary, self.path)

    def recover(self) -> list[dict[str, Any]]:
        """Every row the file holds: finished rows, and an "interrupted" row for each request that was
        opened and never finished. The last line of a request wins."""
        if not self.path.is_file():
            return []
        latest: dict[str, dict[str, Any]] = {}
        for text in self.path.read_text().splitlines():
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            latest[entry["request_id"]] = entry
        rows = []
        for entry in latest.values():
            if entry.pop("open", False):
                entry.update(status=INTERRUPTED, completion_tokens=0, cached_tokens=0)
            rows.append({**entry, "time": datetime.fromisoformat(entry["time"])})
        return rows

    def close(self) -> None:
        self._close()

    def _append(self, row: dict[str, Any]) -> None:
        if self._out is None:
            self._out = os.fdopen(open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")
        self._out.write(_line(row))
        self._out.flush()  # into the kernel: it survives the process

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _line(row: dict[str, Any]) -> str:
    time = row["time"]
    return json.dumps({**row, "time": time.isoformat() if isinstance(time, datetime) else time}) + "\n"


__all__ = ["INTERRUPTED", "UsageJournal"]
