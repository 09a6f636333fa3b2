"""What the fuzz tests check after a run: the in-process replica holds no request and no KV block."""

from __future__ import annotations

import time


def settled(core) -> bool:
    """True once the replica holds nothing (waits up to 5 s for streams being torn down)."""
    for _ in range(250):
        stats = core.stats()
        if stats["in_flight"] == 0 and not stats["kv_blocks_held"]:
            return True
        time.sleep(0.02)
    return False
