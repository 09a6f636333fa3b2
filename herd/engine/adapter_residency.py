"""Which registered LoRA adapters sit in the model's adapter bank, and which slot a newly needed one takes.

The engine registers adapters by name, each loaded and checked on the host once (herd.model.lora.load_adapter);
the bank (herd.model.lora_bank) holds `slots` of them on the model's device. A sequence of adapter X is admitted
only once X is resident: X takes a free slot, else the least recently used slot whose adapter no running sequence
uses (evicted); when every slot is held by running sequences, the sequence waits. Loads and evictions happen while
the scheduler admits, between steps on the engine thread; a running sequence's adapter is never evicted, so a
step's chunks only name resident adapters.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from herd.model.lora import LoRAAdapter
from herd.model.lora_bank import AdapterBank


def pick_slot(occupants: Sequence[str | None], last_used: Mapping[str, int], pinned: Collection[str]) -> int | None:
    """The slot a new adapter takes: the first empty one, else the least recently used one whose occupant is not
    pinned (used by a running sequence); None when every slot is pinned."""
    for slot, name in enumerate(occupants):
        if name is None:
            return slot
    free = [(last_used.get(name, -1), slot) for slot, name in enumerate(occupants)
            if name is not None and name not in pinned]
    return min(free)[1] if free else None


@dataclass(frozen=True)
class Registered:
    """An adapter loaded on the host, and the tag that keys its prefix-cache chain (unique per registration, so a
    name registered again never reuses the KV of the adapter it named before)."""

    adapter: LoRAAdapter
    tag: str


class AdapterResidency:
    """The registered adapters (by name) and the bank's occupants."""

    def __init__(self, bank: AdapterBank) -> None:
        self.bank = bank
        self.registered: dict[str, Registered] = {}
        self.occupants: list[str | None] = [None] * bank.slots
        self._last_used: dict[str, int] = {}
        self._clock = itertools.count()
        self._registrations = itertools.count()
        self.loads = 0
        """Adapters loaded into the bank since the start, and those evicted to make room."""
        self.evictions = 0

    def register(self, name: str, adapter: LoRAAdapter) -> None:
        """Add `name` (ValueError if taken; AdapterError, nothing registered, if the bank cannot hold it)."""
        if name in self.registered:
            raise ValueError(f"adapter {name!r} is already registered")
        self.bank.check_fits(adapter)
        self.registered[name] = Registered(adapter, f"{name}#{next(self._registrations)}")

    def unregister(self, name: str) -> None:
        """Forget `name` and empty its slot (the caller checks that no request uses it)."""
        del self.registered[name]
        if name in self.occupants:
            slot = self.occupants.index(name)
            self.bank.unload(slot)
            self.occupants[slot] = None
        self._last_used.pop(name, None)

    @property
    def resident(self) -> int:
        return sum(name is not None for name in self.occupants)

    def ensure(self, name: str, pinned: Collection[str]) -> bool:
        """Make `name` resident (loading it, evicting an unpinned adapter if no slot is free); False when every
        slot is held by an adapter in `pinned`."""
        if name in self.occupants:
            self._last_used[name] = next(self._clock)
            return True
        slot = pick_slot(self.occupants, self._last_used, pinned)
        if slot is None:
            return False
        if (evicted := self.occupants[slot]) is not None:
            self.evictions += 1
            self._last_used.pop(evicted, None)
            self.occupants[slot] = None  # the load empties the slot first, even one that fails (expert shards)
        self.bank.load(slot, self.registered[name].adapter)  # replaces the evicted adapter's entries
        self.occupants[slot] = name
        self._last_used[name] = next(self._clock)
        self.loads += 1
        return True

    def slot(self, name: str | None) -> int:
        """The bank slot of a resident adapter (-1 for None: the base model), marked as used now."""
        if name is None:
            return -1
        self._last_used[name] = next(self._clock)
        return self.occupants.index(name)
