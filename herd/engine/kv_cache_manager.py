"""Which KV blocks each sequence holds: paged, iRoPE-aware, with a tenant-salted prefix cache.

Layers come in two groups with separate block pools. Global (NoPE, full-attention) layers keep every
token of a sequence. Chunked (RoPE) layers attend only within fixed chunks of `chunk_size` tokens, so
they keep only the chunk the sequence is in: the blocks of earlier chunks are released the moment the
sequence's computed tokens cross into the next chunk. Block i of a table covers positions
[i*B, (i+1)*B); a released chunked entry becomes None. chunk_size is a multiple of the block size B.

Full blocks are registered in their group's prefix cache under a hash chain salted with the
sequence's cache salt; a new or preempted sequence starts from the longest cached prefix it can use:
all of its global blocks, and for the chunked layers only the blocks of the chunk it resumes in.

A sequence may be forked (the choices of an n > 1 request): the child's tables name the parent's blocks, each
taken by reference. A block is written in place only by its one holder: allocation gives a sequence that is
about to write into a block others hold (the prompt's partial last block) a fresh block instead, and lists the
copy (group, shared block, fresh block) that the model runner makes before the step's forward (copy-on-write).
Positions a holder writes in place lie past what any other holder reads, so a copy taken later is never wrong.

With a host tier (herd.engine.host_block_index), a cached block the device pool evicts to reuse is saved to the
host under the same hash first, and a prefix counts the blocks found on the device or the host: admission gives a
host block a fresh device block and lists the restore. The model runner makes the listed moves before the step's
forward: saves, then restores, then copy-on-write copies (a restore may land in a block just saved, a copy may read
a block just restored). The host is keyed by the same tenant-salted chain, so a tenant finds only its own blocks.

A prefix can move between engines (prefill/decode disaggregation, herd.engine.kv_export): `locate_prefix` says where
the blocks a chain's admission would take are (device or host), for an export to read; `reserve_import` gives an
import's blocks fresh device blocks registered under their keys, and `finish_import` leaves them cached and
unreferenced, as a finished request leaves its blocks.
Pure bookkeeping: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from herd.engine.block_pool import BlockPool
from herd.engine.host_block_index import HostBlockIndex
from herd.engine.prefix_hash import block_hashes
from herd.engine.sequence import Sequence
from herd.engine.shared_blocks import SharedBlockView

FULL = "full"
CHUNKED = "chunked"

BlockPlace = tuple[bool, int]
"""Where a cached block is: (True, device block) or (False, host slot)."""

CachedBlock = tuple[str, int, bytes]
"""A block registered in the prefix cache: (group, block, its prefix hash)."""


@dataclass(frozen=True)
class ImportPlan:
    """Blocks held for a prefix being imported (KVCacheManager.reserve_import), per group: every block of the
    group's needed range in chain order, and (position in that range, block) of those the import writes."""

    held: dict[str, list[int]]
    fresh: dict[str, list[tuple[int, int]]]


@dataclass(frozen=True, kw_only=True)
class KVLayout:
    """Block geometry of the cache; sizes come from the engine config and the model."""

    block_size: int
    """B: tokens per block."""
    chunk_size: int | None
    """Local-attention chunk of the chunked group; None when the model has no chunked layers."""
    num_blocks: dict[str, int]
    """Blocks in each group's pool."""
    bytes_per_block: dict[str, int]
    """Bytes one block takes across all layers of its group (keys and values)."""

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size % self.block_size:
            raise ValueError(
                f"attention_chunk_size {self.chunk_size} is not a multiple of block_size {self.block_size}"
            )
        if (self.chunk_size is None) != (CHUNKED not in self.num_blocks):
            raise ValueError("a chunked block pool goes with a chunk size, and only then")


class KVCacheManager:
    """Block tables of every running sequence, over one BlockPool per layer group."""

    def __init__(self, layout: KVLayout, *, enable_prefix_caching: bool = True,
                 host_blocks: dict[str, int] | None = None) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self.pools: dict[str, BlockPool | SharedBlockView] = {
            group: BlockPool(n) for group, n in layout.num_blocks.items()}
        self.enable_prefix_caching = enable_prefix_caching
        self.host = HostBlockIndex(host_blocks) if host_blocks and enable_prefix_caching else None
        """The host tier's slots per group (None: no host tier)."""
        self._tables: dict[str, dict[str, list[int | None]]] = {}
        self._hashes: dict[str, list[bytes]] = {}
        self._copies: list[tuple[str, int, int]] = []
        self._saves: list[tuple[str, int, int]] = []  # (group, device block, host slot)
        self._restores: list[tuple[str, int, int]] = []  # (group, host slot, device block)
        self.prefix_queried_tokens = 0
        """Tokens looked up in the prefix cache at admission, and those found (the hit rate's two counts)."""
        self.prefix_hit_tokens = 0
        self.host_hit_blocks = 0
        """Host tier since the start: blocks restored (both groups), prompt tokens whose blocks came (in part) from
        the host, and bytes saved to and restored from it."""
        self.host_hit_tokens = 0
        self.host_saved_bytes = 0
        self.host_restored_bytes = 0

    def share_pool(self, group: str, view: SharedBlockView) -> None:
        """Take `group`'s blocks from the pool the replica's trunks share (context parallelism,
        herd.engine.shared_blocks), before any sequence is admitted; the view's home is this manager's own pool."""
        if self._tables:
            raise RuntimeError("a pool is shared before the manager holds any sequence")
        if self.host is not None:
            raise ValueError("a host KV tier saves blocks of this trunk's memory only: it does not go with blocks "
                             "shared across trunks (context parallelism)")
        if view.num_blocks != self.layout.num_blocks[group]:
            raise ValueError(f"the shared view's home has {view.num_blocks} {group} blocks, this trunk's layout "
                             f"{self.layout.num_blocks[group]}")
        self.pools[group] = view

    # --- the scheduler's questions -------------------------------------------------------------
    def admit(self, seq: Sequence) -> None:
        """Give a waiting sequence its tables, starting from the longest usable cached prefix. A sequence still
        owed prompt logprobs takes no cached block past the positions it has scored (Sequence.cacheable_tokens):
        a new one computes its whole prompt, since cached tokens have no logits."""
        self._tables[seq.request_id] = {group: [] for group in self.pools}
        self._hashes[seq.request_id] = []
        seq.num_computed = 0
        seq.num_cached_prompt_tokens = 0
        if not self.enable_prefix_caching:
            return
        known = seq.token_ids()
        usable = min(len(known) - 1, seq.cacheable_tokens)  # leave a token to compute
        keys = block_hashes(known[:usable], self.block_size, seq.cache_salt, images=seq.image_spans)
        hit = self._longest_usable_prefix(keys)
        tables = self._tables[seq.request_id]
        restored: set[int] = set()
        for group, pool in self.pools.items():
            first = self._first_needed(group, hit)
            # Device blocks first, so the restores' allocations cannot evict them; host slots pinned before any
            # allocation, so a save cannot take them.
            taken = [pool.take_cached(keys[i]) for i in range(first, hit)]
            host = {i: self.host.take(group, keys[i]) for i in range(first, hit) if taken[i - first] is None} \
                if self.host is not None else {}
            for i, slot in host.items():
                block = self._allocate(group)
                pool.register(block, keys[i])
                self._restores.append((group, slot, block))
                self.host_restored_bytes += self.layout.bytes_per_block[group]
                taken[i - first] = block
            restored |= host.keys()
            self.host_hit_blocks += len(host)
            released: list[int | None] = [None] * first  # the chunks before the one it resumes in
            tables[group] = released + taken
        self.host_hit_tokens += len(restored) * self.block_size
        self._hashes[seq.request_id] = keys[:hit]
        seq.num_computed = seq.num_cached_prompt_tokens = hit * self.block_size
        self.prefix_queried_tokens += len(known) - 1
        self.prefix_hit_tokens += seq.num_cached_prompt_tokens

    def cancel_admit(self, seq: Sequence) -> None:
        """Undo an admission the scheduler could not complete (no blocks for the rest of the step): the blocks it
        took go back, and its lookup is not counted, since the sequence is looked up again when admitted later
        (the hit rate counts requests' tokens once). Host tier moves already listed stand: they happened."""
        if self.enable_prefix_caching:
            self.prefix_queried_tokens -= len(seq.token_ids()) - 1
            self.prefix_hit_tokens -= seq.num_cached_prompt_tokens
        self.free(seq)
        seq.num_computed = seq.num_cached_prompt_tokens = 0

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for the seq's next num_tokens tokens in every group, all or nothing; a shared block it would
        write into is replaced by a copy of its own (copy-on-write)."""
        end = seq.num_computed + num_tokens
        needed = self._missing(seq, end)
        shared = self._shared_written(seq, end)
        if any(len(needed[group]) + len(shared[group]) > self.pools[group].num_free for group in needed):
            return False
        tables = self._tables[seq.request_id]
        for group, indices in needed.items():
            table, pool = tables[group], self.pools[group]
            for i in shared[group]:
                source, copy = table[i], self._allocate(group)
                assert source is not None
                pool.release(source)
                table[i] = copy
                self._copies.append((group, source, copy))
            for i in indices:
                while len(table) <= i:
                    table.append(None)
                table[i] = self._allocate(group)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give child the parent's tables (every block taken once more) and computed tokens: a choice of an n > 1
        request starts from its prompt, computed once."""
        tables = self._tables[parent.request_id]
        self._tables[child.request_id] = {group: list(table) for group, table in tables.items()}
        for group, table in tables.items():
            for block in table:
                if block is not None:
                    self.pools[group].share(block)
        self._hashes[child.request_id] = list(self._hashes[parent.request_id])
        child.num_computed = parent.num_computed
        child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens

    def take_copies(self) -> list[tuple[str, int, int]]:
        """The block copies (group, source, destination) allocation asked for since the last call; the model
        runner makes them before the forward that writes the destinations."""
        copies, self._copies = self._copies, []
        return copies

    def take_host_moves(self) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
        """The host tier's moves listed since the last call: saves (group, device block, host slot) of evicted
        blocks, then restores (group, host slot, device block) of admitted host hits; the model runner makes them, in
        that order, before the step's forward and before take_copies' copies. The restored slots are free to be
        reused from then on."""
        saves, restores = self._saves, self._restores
        self._saves, self._restores = [], []
        if self.host is not None:
            self.host.unpin_all()
        return saves, restores

    def on_computed(self, seq: Sequence) -> list[CachedBlock]:
        """After a step: cache the blocks it filled, release chunk blocks the sequence has moved past. The blocks
        registered in the prefix cache (what uncache undoes, should the step turn out to have failed)."""
        tables = self._tables[seq.request_id]
        registered: list[CachedBlock] = []
        keys = self._hashes[seq.request_id] if self.enable_prefix_caching else None
        if keys is not None and seq.num_computed // self.block_size > len(keys):  # a block was filled
            known = seq.token_ids()[: seq.num_computed]
            new = block_hashes(known, self.block_size, seq.cache_salt, start=len(keys),
                               parent=keys[-1] if keys else None, images=seq.image_spans)
            for i, key in enumerate(new, start=len(keys)):
                for group, table in tables.items():
                    block = table[i] if i < len(table) else None
                    if block is not None and self.pools[group].register(block, key):
                        registered.append((group, block, key))
            keys.extend(new)
        if CHUNKED in tables:
            table = tables[CHUNKED]
            passed = min(self._window_start(seq.num_computed) // self.block_size, len(table))
            # Blocks before an earlier window start were released then: only the last chunk's can remain.
            for i in range(passed - 1, -1, -1):
                block = table[i]
                if block is None:
                    break
                self.pools[CHUNKED].release(block)
                table[i] = None
        return registered

    def uncache(self, registered: list[CachedBlock]) -> set[tuple[str, int]]:
        """Undo on_computed's registrations for a step whose forward failed after they were made (async scheduling
        counts a step done before its forward ends): those blocks' KV was never (fully) written, so no later prefix
        may take them. Each block still under its hash leaves the cache (freed uncached once its holders let go);
        the (group, block) pairs that did. Whoever holds one (the step's sequences, or one admitted since with a
        prefix hit on it) holds garbage and must end or start again: that is the caller's, who knows the sequences."""
        dropped: set[tuple[str, int]] = set()
        for group, block, key in registered:
            if self.pools[group].unregister(block, key):
                dropped.add((group, block))
        return dropped

    def holds_any(self, seq: Sequence, blocks: set[tuple[str, int]]) -> bool:
        """Whether seq's tables name any of these (group, block) pairs."""
        tables = self._tables.get(seq.request_id, {})
        return any((group, block) in blocks for group, table in tables.items() for block in table)

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past the seq's computed tokens (taken for draft tokens the model rejected): what it
        holds is again what a step without drafts would have left. Those blocks were written past num_computed
        only, so none is cached or shared."""
        keep = -(-seq.num_computed // self.block_size)
        for group, table in self._tables[seq.request_id].items():
            pool = self.pools[group]
            for block in table[keep:]:
                if block is not None:
                    pool.release(block)
            del table[keep:]

    def free(self, seq: Sequence) -> None:
        """Release everything the sequence holds (finished, aborted or preempted)."""
        tables = self._tables.pop(seq.request_id, {})
        self._hashes.pop(seq.request_id, None)
        for group, table in tables.items():
            for block in table:
                if block is not None:
                    self.pools[group].release(block)

    # --- a prefix moved between engines (herd.engine.kv_export) ------------------------------------
    def needed_range(self, group: str, hit: int) -> range:
        """Block indices of group a prefix of `hit` blocks takes at admission: all for the global layers, those of
        hit's chunk for the chunked ones."""
        return range(self._first_needed(group, hit), hit)

    def locate_prefix(self, keys: list[bytes]) -> tuple[int, dict[str, list[BlockPlace]]]:
        """The most blocks h of a chain that admission could take here (every block of each group's needed range
        cached on the device or the host, room aside), and where each block of those ranges is."""
        hit = len(keys)
        if FULL in self.pools:
            hit = next((h for h, key in enumerate(keys) if not self._present(FULL, key)), hit)
        if CHUNKED in self.pools:
            hit = next((h for h in range(hit, 0, -1)
                        if all(self._present(CHUNKED, keys[i]) for i in self.needed_range(CHUNKED, h))), 0)
        places = {group: [self._place(group, keys[i]) for i in self.needed_range(group, hit)] for group in self.pools}
        return hit, places

    def reserve_import(self, keys: list[bytes]) -> ImportPlan | None:
        """Hold the blocks of each group's needed range of the chain `keys`: those cached on the device taken
        first (so no allocation evicts them), then a fresh block for each of the others, registered under its
        key (an evicted cached block is listed for the host tier, as any allocation's). None, holding nothing,
        when a group has no room. The caller writes the fresh blocks, then calls finish_import."""
        hit = len(keys)
        for group, pool in self.pools.items():
            needed = [keys[i] for i in self.needed_range(group, hit)]
            cached = [key for key in needed if pool.peek_cached(key)]
            if len(needed) - len(cached) > pool.num_free - sum(pool.cached_free(key) for key in cached):
                return None
        plan = ImportPlan(held={}, fresh={})
        for group, pool in self.pools.items():
            needed = [keys[i] for i in self.needed_range(group, hit)]
            taken = [pool.take_cached(key) for key in needed]
            fresh = [(i, self._allocate(group)) for i, block in enumerate(taken) if block is None]
            for i, block in fresh:
                pool.register(block, needed[i])
                taken[i] = block
            plan.held[group] = [block for block in taken if block is not None]
            plan.fresh[group] = fresh
        return plan

    def finish_import(self, plan: ImportPlan) -> int:
        """Let go of an import's blocks (written by now): cached and unreferenced, the chain's last released first so
        it is evicted first. The blocks written."""
        for group, held in plan.held.items():
            for block in reversed(held):
                self.pools[group].release(block)
        return sum(map(len, plan.fresh.values()))

    # --- what the model runner and reports read ---------------------------------------------------
    def table(self, seq: Sequence, group: str) -> list[int | None]:
        return self._tables[seq.request_id][group]

    def window_start(self, group: str, position: int) -> int:
        """First position a query at `position` attends to in `group`."""
        return 0 if group == FULL else self._window_start(position)

    def blocks_held(self, seq: Sequence) -> dict[str, int]:
        tables = self._tables.get(seq.request_id, {})
        return {group: sum(b is not None for b in table) for group, table in tables.items()}

    def bytes_held(self, seq: Sequence) -> int:
        """KV bytes this sequence pins right now, all layers."""
        return sum(n * self.layout.bytes_per_block[g] for g, n in self.blocks_held(seq).items())

    def full_cache_bytes(self, num_tokens: int) -> int:
        """What a cache that keeps every layer in full would hold for num_tokens tokens."""
        blocks = -(-num_tokens // self.block_size)
        return blocks * sum(self.layout.bytes_per_block.values())

    def num_free(self, group: str) -> int:
        return self.pools[group].num_free

    # --- internals --------------------------------------------------------------------------------
    def _window_start(self, position: int) -> int:
        chunk = self.layout.chunk_size
        return 0 if chunk is None else position // chunk * chunk

    def _missing(self, seq: Sequence, end: int) -> dict[str, list[int]]:
        """Block indices each group lacks for positions [window start of num_computed, end).

        A table holds a block at every index from the window start of num_computed to its end: admission
        fills it from there (chunk blocks before the window are None), allocation appends, and on_computed
        empties only indices before the window start, which never moves back while the sequence runs. So
        what is missing is the indices past the table's end, found without walking the context."""
        last = -(-end // self.block_size)  # blocks needed to hold `end` tokens
        tables = self._tables[seq.request_id]
        missing: dict[str, list[int]] = {}
        for group, table in tables.items():
            first = self.window_start(group, seq.num_computed) // self.block_size
            missing[group] = list(range(max(first, len(table)), last))
        return missing

    def _shared_written(self, seq: Sequence, end: int) -> dict[str, list[int]]:
        """Indices of blocks the seq would write positions [num_computed, end) into that others hold too."""
        first = seq.num_computed // self.block_size
        last = -(-end // self.block_size)
        shared: dict[str, list[int]] = {}
        for group, table in self._tables[seq.request_id].items():
            pool = self.pools[group]
            shared[group] = [i for i in range(first, min(last, len(table)))
                             if (block := table[i]) is not None and pool.refs(block) > 1]
        return shared

    def _allocate(self, group: str) -> int:
        """A fresh block of group's pool; a cached block it evicts is saved to the host tier first (listed)."""
        block, evicted = self.pools[group].allocate_evicting()
        if evicted is not None and self.host is not None:
            slot = self.host.put(group, evicted)
            if slot is not None:
                self._saves.append((group, block, slot))
                self.host_saved_bytes += self.layout.bytes_per_block[group]
        return block

    def _first_needed(self, group: str, hit: int) -> int:
        """First block index a prefix of `hit` blocks needs in group: 0 for the global layers, h's chunk's first
        for the chunked ones."""
        return self.window_start(group, hit * self.block_size) // self.block_size

    def _present(self, group: str, key: bytes) -> bool:
        """Whether a block of this hash is cached on the device or held by the host tier."""
        return self.pools[group].peek_cached(key) or (self.host is not None and self.host.has(group, key))

    def _place(self, group: str, key: bytes) -> BlockPlace:
        block = self.pools[group].cached_block(key)
        if block is not None:
            return True, block
        slot = self.host.slot(group, key) if self.host is not None else None
        assert slot is not None, "only a present block has a place"
        return False, slot

    def _longest_usable_prefix(self, keys: list[bytes]) -> int:
        """Most blocks h such that global blocks 0..h-1 and the chunked blocks of h's chunk are cached (on the device
        or the host) and each pool has free blocks for the host blocks' restores."""
        hit = self._full_prefix(keys) if FULL in self.pools else len(keys)
        if CHUNKED not in self.pools:
            return hit
        for h in range(hit, 0, -1):
            if self._usable(CHUNKED, keys, h):
                return h
        return 0

    def _full_prefix(self, keys: list[bytes]) -> int:
        """Most global blocks 0..h-1 present, with room for them: each restore takes a free block, and so does each
        cached block taken back from the free list. Room only shrinks as h grows, so one pass finds it."""
        pool = self.pools[FULL]
        room = pool.num_free
        for h, key in enumerate(keys):
            if pool.peek_cached(key):
                room -= pool.cached_free(key)
            elif self.host is not None and self.host.has(FULL, key):
                room -= 1
            else:
                return h
            if room < 0:
                return h
        return len(keys)

    def _usable(self, group: str, keys: list[bytes], h: int) -> bool:
        """Whether group's blocks of an h-block prefix are all present, with room on the device for those on the host
        only (the pool's free blocks, less the cached free ones the prefix takes back)."""
        pool = self.pools[group]
        needed = keys[self._first_needed(group, h) : h]
        on_device = [key for key in needed if pool.peek_cached(key)]
        if len(on_device) == len(needed):
            return True
        if not all(self._present(group, key) for key in needed):
            return False
        return len(needed) - len(on_device) <= pool.num_free - sum(pool.cached_free(key) for key in on_device)
