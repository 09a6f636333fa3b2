"""What the fuzz tests check after a run: the in-process replica holds no request and no KV block."""

from __future__ import annotations

from tests.waiting import wait_until


def settled(core) -> bool:
    """True once the replica holds nothing (waits up to 5 s for streams being torn down)."""
    return wait_until(lambda: core.stats()["in_flight"] == 0 and not core.stats()["kv_blocks_held"], timeout_s=5)
