"""Which KV blocks the host tier holds: per layer group, a bounded set of slots keyed by prefix hash, LRU.

Pure bookkeeping (slots are ints; the tensors live in herd.engine.host_kv_tier). The KV cache manager puts a
block here when the device pool evicts it and takes it back at admission; the copies themselves happen in the
model runner before the step's forward. A slot read by a restore planned for the coming step is pinned until the
copies are taken, so a save planned in the same step never overwrites it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the manager imports this module
    from herd.engine.kv_cache_manager import KVLayout


def host_blocks(layout: KVLayout, host_bytes: int) -> dict[str, int]:
    """Slots per group for host_bytes: split as the device pool's bytes are, so both groups keep as many tokens'
    worth of blocks as the device does, relatively."""
    device = {g: n * layout.bytes_per_block[g] for g, n in layout.num_blocks.items()}
    total = sum(device.values())
    return {g: int(host_bytes * device[g] / total) // layout.bytes_per_block[g] for g in device}


class HostBlockIndex:
    """Slots 0..capacity[group]-1 of each group, by prefix hash, least recently used first."""

    def __init__(self, capacity: dict[str, int]) -> None:
        self.capacity = dict(capacity)
        self._slots: dict[str, OrderedDict[bytes, int]] = {g: OrderedDict() for g in capacity}
        """Held hashes of each group and their slot, least recently used first."""
        self._unused: dict[str, list[int]] = {g: list(range(n - 1, -1, -1)) for g, n in capacity.items()}
        self._pinned: set[tuple[str, int]] = set()

    def held(self, group: str) -> int:
        return len(self._slots[group])

    def has(self, group: str, block_hash: bytes) -> bool:
        return block_hash in self._slots[group]

    def put(self, group: str, block_hash: bytes) -> int | None:
        """A slot to save a block evicted from the device under block_hash (the least recently used unpinned slot
        when all are held), or None: already held (made most recent: no copy needed), or every slot pinned."""
        slots = self._slots[group]
        if block_hash in slots:
            slots.move_to_end(block_hash)
            return None
        if self._unused[group]:
            slot = self._unused[group].pop()
        else:
            victim = next((h for h, s in slots.items() if (group, s) not in self._pinned), None)
            if victim is None:
                return None
            slot = slots.pop(victim)
        slots[block_hash] = slot
        return slot

    def slot(self, group: str, block_hash: bytes) -> int | None:
        """The slot holding block_hash (neither pinned nor made recent: read it before anything is saved), or None."""
        return self._slots[group].get(block_hash)

    def take(self, group: str, block_hash: bytes) -> int:
        """The slot holding block_hash, to restore from: made most recent and pinned until unpin_all."""
        slot = self._slots[group][block_hash]
        self._slots[group].move_to_end(block_hash)
        self._pinned.add((group, slot))
        return slot

    def unpin_all(self) -> None:
        """The planned copies were made: every slot may be reused again."""
        self._pinned.clear()
