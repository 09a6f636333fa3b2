"""The global-layer blocks of a replica's trunks as one pool (context parallelism, issue 28): a sequence's global
(NoPE) KV may take blocks of any trunk's memory, so a replica holds a sequence longer than one trunk's cache.

Legend: M trunks, n blocks of the global group per trunk.

Each trunk keeps its own BlockPool of n blocks (its memory: the paged cache's global layers hold n blocks, plus the
scratch block n). `SharedBlocks` joins them; each trunk's KVCacheManager sees them through its own `view`, a
BlockPool in every way the manager uses one:
- ids: the trunk's own blocks keep their ids 0..n-1 (so everything that reads a table of home blocks, the attention
  plan above all, works unchanged); trunk p's block b is (n + 1) * (p + 1) + b in every other trunk's view, past
  the scratch block (`holder` decodes both);
- allocation takes a home block while there is one (evicting home's least recently used cached block first), then a
  block of the peer with the most free ones;
- room (`num_free`) is every trunk's free blocks: the scheduler admits and preempts against the replica's memory;
- the prefix cache is every trunk's (a hit on a peer's cached block is a remote block like any other), home first;
- `num_blocks` and `used` count home alone: what this trunk's memory holds, so stats summed over trunks are the
  replica's.

Pure bookkeeping, no locks: the trunks' engines take a shared lock around every use of their manager while the
group steps (ModelRunner.kv_lock).
"""

from __future__ import annotations

from collections.abc import Sequence

from herd.engine.block_pool import BlockPool


class SharedBlocks:
    """One BlockPool per trunk, every one the same size."""

    def __init__(self, pools: Sequence[BlockPool]) -> None:
        if len({pool.num_blocks for pool in pools}) != 1:
            raise ValueError("every trunk's global-layer pool has the same number of blocks")
        self.pools = list(pools)
        self.blocks_per_trunk = pools[0].num_blocks

    def view(self, rank: int) -> SharedBlockView:
        return SharedBlockView(self, rank)


class SharedBlockView:
    """The shared pool as trunk `rank`'s KVCacheManager sees it (the BlockPool interface, in that trunk's ids)."""

    def __init__(self, shared: SharedBlocks, rank: int) -> None:
        self.shared, self.rank = shared, rank
        self.home = shared.pools[rank]
        self.num_blocks = self.home.num_blocks
        """This trunk's blocks (what its memory holds)."""

    # --- ids ------------------------------------------------------------------------------------------------------
    def holder(self, block: int) -> tuple[int, int]:
        """(trunk, its block id) of a block id of this view."""
        n = self.shared.blocks_per_trunk
        if block < n:
            return self.rank, block
        return block // (n + 1) - 1, block % (n + 1)

    def _id(self, trunk: int, block: int) -> int:
        return block if trunk == self.rank else (self.shared.blocks_per_trunk + 1) * (trunk + 1) + block

    def _order(self) -> list[int]:
        """Trunks to look in: home first, then the others by rank."""
        return [self.rank] + [t for t in range(len(self.shared.pools)) if t != self.rank]

    def _find(self, block_hash: bytes) -> tuple[int, int] | None:
        """(trunk, block) holding a cached prefix hash, home first."""
        for trunk in self._order():
            block = self.shared.pools[trunk].cached_block(block_hash)
            if block is not None:
                return trunk, block
        return None

    # --- BlockPool ------------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Free blocks of every trunk: the replica's room."""
        return sum(pool.num_free for pool in self.shared.pools)

    @property
    def used(self) -> int:
        """Home blocks in use (by any trunk's sequences)."""
        return self.home.num_blocks - self.home.num_free

    def allocate(self) -> int:
        return self.allocate_evicting()[0]

    def allocate_evicting(self) -> tuple[int, bytes | None]:
        """A home block while there is one, else the freest peer's; and the hash it evicted from the cache."""
        freest = max(self._order(), key=lambda t: self.shared.pools[t].num_free)
        trunk = self.rank if self.home.num_free else freest
        block, evicted = self.shared.pools[trunk].allocate_evicting()
        return self._id(trunk, block), evicted

    def take_cached(self, block_hash: bytes) -> int | None:
        found = self._find(block_hash)
        if found is None:
            return None
        trunk, block = found
        self.shared.pools[trunk].take_cached(block_hash)
        return self._id(trunk, block)

    def share(self, block: int) -> None:
        trunk, local = self.holder(block)
        self.shared.pools[trunk].share(local)

    def peek_cached(self, block_hash: bytes) -> bool:
        return self._find(block_hash) is not None

    def cached_block(self, block_hash: bytes) -> int | None:
        found = self._find(block_hash)
        return None if found is None else self._id(*found)

    def cached_free(self, block_hash: bytes) -> bool:
        found = self._find(block_hash)
        return found is not None and self.shared.pools[found[0]].refs(found[1]) == 0

    def release(self, block: int) -> None:
        trunk, local = self.holder(block)
        self.shared.pools[trunk].release(local)

    def register(self, block: int, block_hash: bytes) -> bool:
        """Cache a full block under its hash, unless some trunk caches that hash already (one copy per replica)."""
        if self._find(block_hash) is not None:
            return False
        trunk, local = self.holder(block)
        return self.shared.pools[trunk].register(local, block_hash)

    def unregister(self, block: int, block_hash: bytes) -> bool:
        trunk, local = self.holder(block)
        return self.shared.pools[trunk].unregister(local, block_hash)

    def cached_hashes(self) -> frozenset[bytes]:
        return frozenset().union(*(pool.cached_hashes() for pool in self.shared.pools))

    def refs(self, block: int) -> int:
        trunk, local = self.holder(block)
        return self.shared.pools[trunk].refs(local)
