"""Which gateway runs a database's batches: one at a time, so that two gateways never run the same line at once.

On PostgreSQL a session advisory lock, taken without waiting and held on a connection of its own: it goes when
that connection does (its gateway stopped, killed or cut off), and another gateway's runner takes it at its next
round. SQLite is one process's embedded database: its runner always holds it.
"""

from __future__ import annotations

import contextlib
import threading

from sqlalchemy import Connection, Engine, text

LOCK_KEY = 0x4865_7264_4261_7463  # pg_try_advisory_lock key of the batch runner ("HerdBatc")


class RunnerLock:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connection: Connection | None = None
        self._guard = threading.Lock()  # held() runs on worker threads

    def held(self) -> bool:
        """Whether this process runs the batches now (taking the lock when it is free). Blocking."""
        if self.engine.dialect.name != "postgresql":
            return True
        with self._guard:
            if self._connection is not None:
                try:
                    self._connection.execute(text("SELECT 1"))
                    return True
                except Exception:  # the connection, and the lock with it, is gone
                    self._close()
            connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                taken = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}).scalar())
            except Exception:
                connection.close()
                raise
            if taken:
                self._connection = connection
            else:
                connection.close()
            return taken

    def release(self) -> None:
        with self._guard:
            self._close()

    def _close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None


__all__ = ["LOCK_KEY", "RunnerLock"]
