"""A pool of KV blocks: reference counts, a free list in LRU order, and the prefix-cache index.

Pure bookkeeping (block ids are ints; the tensors live in the model runner). A block whose last user
let go goes to the end of the free list but keeps its hash, so a later request with the same prefix
can take it back; allocation takes the least recently freed block and only then forgets its hash.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    """Blocks 0..num_blocks-1 of one KV group."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks no sequence uses (some still hold a cached prefix until reused)."""
        return len(self._free)

    @property
    def used(self) -> int:
        """Blocks some sequence uses."""
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        """A block for new tokens, referenced once. The caller checked num_free first."""
        return self.allocate_evicting()[0]

    def allocate_evicting(self) -> tuple[int, bytes | None]:
        """A block for new tokens, and the prefix hash it held until now (evicted from the cache: what a host tier
        saves before the block is overwritten), or None."""
        block, _ = self._free.popitem(last=False)
        old = self._hash[block]
        if old is not None:
            del self._cached[old]
            self._hash[block] = None
        self._refs[block] = 1
        return block, old

    def take_cached(self, block_hash: bytes) -> int | None:
        """The block holding this prefix hash, with one more reference, or None."""
        block = self._cached.get(block_hash)
        if block is not None:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        return block

    def share(self, block: int) -> None:
        """One more reference to a block in use (a forked sequence's table names it too)."""
        if self._refs[block] <= 0:
            raise RuntimeError(f"block {block} is free: only a block in use is shared")
        self._refs[block] += 1

    def peek_cached(self, block_hash: bytes) -> bool:
        return block_hash in self._cached

    def cached_block(self, block_hash: bytes) -> int | None:
        """The block holding this prefix hash (no reference taken: read it before anything is allocated), or None."""
        return self._cached.get(block_hash)

    def cached_free(self, block_hash: bytes) -> bool:
        """Whether a cached block holds this hash and no sequence uses it (taking it shrinks num_free)."""
        block = self._cached.get(block_hash)
        return block is not None and self._refs[block] == 0

    def release(self, block: int) -> None:
        """Drop one reference; at zero the block is free again (most recently used end)."""
        if self._refs[block] <= 0:
            raise RuntimeError(f"block {block} released more often than taken")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free[block] = None

    def register(self, block: int, block_hash: bytes) -> bool:
        """Make a full block findable by its prefix hash (first block with a hash wins); whether this one did."""
        if self._hash[block] is None and block_hash not in self._cached:
            self._hash[block] = block_hash
            self._cached[block_hash] = block
            return True
        return False

    def unregister(self, block: int, block_hash: bytes) -> bool:
        """Make a block no longer findable under block_hash (its KV was never written: the step that filled it
        failed), if it still holds that hash; a free one moves to the front of the free list, to be reused first.
        A block holding another hash, or none (evicted and reused since), is left as it is. Whether it was dropped."""
        if self._hash[block] != block_hash:
            return False
        self._hash[block] = None
        del self._cached[block_hash]
        if self._refs[block] == 0:
            self._free.move_to_end(block, last=False)
        return True

    def cached_hashes(self) -> frozenset[bytes]:
        """The prefix hashes findable now (what a later request could take)."""
        return frozenset(self._cached)

    def refs(self, block: int) -> int:
        return self._refs[block]
