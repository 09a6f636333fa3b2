"""The host tier's KV tensors: per layer, a copy of every tensor the device cache holds the layer's blocks in.

Legend: S host slots of the layer's group, and the rest of each device tensor's shape after its block dimension.

Pinned host memory on CUDA (so the copies run asynchronously, in stream order with the forward that follows), plain
CPU tensors otherwise: a real second pool either way. Which slot holds which hash is the KV cache manager's
bookkeeping (herd.engine.host_block_index); this only moves blocks, through PagedKVCache.layer_tensors, so whatever
a block's contents are (keys, values, scales) travels whole.
"""

from __future__ import annotations

import torch

from herd.engine.paged_kv import PagedKVCache


class HostKVTier:
    """host[layer][i]: [S, *device tensor i's block shape] for every layer of the cache, in its group's slots."""

    def __init__(self, cache: PagedKVCache, slots: dict[str, int]) -> None:
        self.cache = cache
        self.groups = list(cache.groups)
        first = cache.layer_tensors(0)[0]
        pin = first.device.type == "cuda"
        self.host = [
            [torch.zeros(slots.get(group, 0), *t.shape[1:], dtype=t.dtype, pin_memory=pin)
             for t in cache.layer_tensors(layer)]
            for layer, group in enumerate(self.groups)
        ]

    @property
    def nbytes(self) -> int:
        """Host memory the tier's tensors take."""
        return sum(t.nbytes for tensors in self.host for t in tensors)

    def save(self, saves: list[tuple[str, int, int]]) -> None:
        """Copy device blocks to host slots, (group, block, slot) each, in every layer of the group."""
        for group, block, slot in saves:
            for device, host in self._pairs(group):
                host[slot].copy_(device[block], non_blocking=True)

    def restore(self, restores: list[tuple[str, int, int]]) -> None:
        """Copy host slots into device blocks, (group, slot, block) each, in every layer of the group."""
        for group, slot, block in restores:
            for device, host in self._pairs(group):
                device[block].copy_(host[slot], non_blocking=True)

    def _pairs(self, group: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device tensor, host tensor) of every layer of the group."""
        return [pair for layer, g in enumerate(self.groups) if g == group
                for pair in zip(self.cache.layer_tensors(layer), self.host[layer], strict=True)]
