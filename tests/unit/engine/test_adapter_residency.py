"""Which slot a newly needed LoRA adapter takes: free first, else the least recently used unpinned one."""

from __future__ import annotations

from herd.engine.adapter_residency import pick_slot


def test_a_free_slot_first():
    assert pick_slot(["a", None, None], {"a": 0}, pinned={"a"}) == 1


def test_least_recently_used_unpinned_is_evicted():
    occupants = ["a", "b", "c"]
    assert pick_slot(occupants, {"a": 5, "b": 2, "c": 9}, pinned=set()) == 1
    assert pick_slot(occupants, {"a": 5, "b": 2, "c": 9}, pinned={"b"}) == 0


def test_every_slot_pinned_means_wait():
    assert pick_slot(["a", "b"], {"a": 1, "b": 2}, pinned={"a", "b"}) is None
