"""Context parallelism in the engine (issue 28): a sequence whose global-layer (NoPE) blocks lie in several trunks'
paged caches attends where its keys are, and the parts merge exactly.

Legend: M trunks, N query heads, K key/value heads, D head dim, B tokens per block, Q query rows asked of a peer,
L key blocks read there, W new tokens' k/v it keeps.

The blocks come from the pool the trunks share (herd.engine.shared_blocks): a block id of a trunk's tables says
which trunk holds it. A step's chunks whose global blocks are all home attend as ever (herd.engine.paged_attention);
the others, `spread` chunks, are planned here once per step (`plan`), and at every global layer:
  1. each new token's k/v is written where its block is: home blocks by the step's own write, and for each peer the
     rows it keeps are shipped to it;
  2. the chunk's queries go to every peer that holds any of its blocks, with those blocks (block id there, first
     position, the chunk's segment in the request); the peer writes the rows shipped, reads those blocks from its
     cache and answers each query's partial attention and log-sum-exp (herd.model.partial_attention) over them,
     a query seeing the keys of its own segment up to its own position;
  3. the owner attends the same queries over its home blocks and merges its part with the answers.
Every global layer of every forward is one exchange of each trunk with every other, headers always (lockstep: a
trunk with nothing to ask or answer still says so, as an idle trunk's empty micro-batches do), payloads when the
headers announce them; all sends and receives of a phase are posted before any is waited on, so no order of peers
deadlocks. Tags `TAG_BASE + 8 * layer + purpose` keep layers apart; the micro-batches of one step exchange in the
same order on every trunk (herd.model.micro_batch), so their messages never cross.

The link is the replica's collective group (herd.workers.collective: gloo here, NCCL on GPUs, untested); the trunks
are its ranks 0..M-1. Spread chunks attend with a masked attention in torch (herd.model.partial_attention), MAX_KEYS
keys at a time merged by log-sum-exp, so memory stays bounded at any context; a fused GPU kernel that returns the
log-sum-exp (flash-attention's) would be the fast one, and is not written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import torch
from torch._C._distributed_c10d import Work

from herd.engine.errors import Code, HerdError
from herd.engine.fault_hold import EXPERTS_LOST
from herd.engine.kv_cache_manager import KVCacheManager
from herd.engine.paged_kv import PagedKVCache
from herd.engine.scheduler import ScheduledChunk
from herd.engine.shared_blocks import SharedBlockView
from herd.model.partial_attention import attend_partial_masked, combine_partials, merge_partials

TAG_BASE = 1 << 16  # clear of the small tags the expert transport uses on the same group
MAX_KEYS = 8192
"""Keys one partial attention call reads at most (the others merge by log-sum-exp): bounds its scores' memory."""


class Purpose(IntEnum):
    """What a message of a global layer's exchange carries; part of its tag."""

    HEADER = 0
    QUERIES = 1
    QUERY_META = 2
    KEY_BLOCKS = 3
    WRITES = 4
    WRITE_SLOTS = 5
    OUT = 6
    LSE = 7


def tag(layer: int, purpose: Purpose) -> int:
    return TAG_BASE + 8 * layer + int(purpose)


class PeerLink(Protocol):
    """Point-to-point messages between the trunks (herd.workers.collective.CollectiveGroup is one)."""

    rank: int

    def send(self, tensor: torch.Tensor, to: int, tag: int) -> Work: ...

    def recv(self, tensor: torch.Tensor, source: int, tag: int) -> Work: ...

    def wait(self, work: Work, *, timeout_s: float | None = None) -> None: ...


@dataclass(frozen=True)
class ContextParallel:
    """One trunk's part in context parallelism: its link to the other trunks (ranks 0..trunks-1) and its view of the
    shared global-layer blocks."""

    link: PeerLink
    trunks: int
    blocks: SharedBlockView
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    timeout_s: float | None = None

    @property
    def peers(self) -> list[int]:
        return [t for t in range(self.trunks) if t != self.link.rank]


@dataclass
class _PeerPart:
    """What one step asks of one peer at every global layer."""

    queries: torch.Tensor  # [Q] indices into the spread rows
    key_blocks: torch.Tensor  # [3, L] int64: block id at the peer, first position, segment
    write_rows: torch.Tensor  # [W] rows of the step whose k/v the peer keeps
    write_slots: torch.Tensor  # [W] their slots in the peer's cache


@dataclass
class _Request:
    """One global layer's message from one trunk to another (sent, or received into)."""

    q: torch.Tensor  # [Q, N, D]
    q_meta: torch.Tensor  # [2, Q] int64: position, segment
    key_blocks: torch.Tensor  # [3, L] int64
    writes: torch.Tensor  # [2, W, K, D]: keys, values
    write_slots: torch.Tensor  # [W] int64

    def header(self) -> torch.Tensor:
        return torch.tensor([self.q.shape[0], self.key_blocks.shape[1], self.write_slots.shape[0]],
                            dtype=torch.int64, device=self.q.device)  # [3]

    def payload(self) -> list[tuple[torch.Tensor, Purpose]]:
        return [(self.q, Purpose.QUERIES), (self.q_meta, Purpose.QUERY_META), (self.key_blocks, Purpose.KEY_BLOCKS),
                (self.writes, Purpose.WRITES), (self.write_slots, Purpose.WRITE_SLOTS)]


def is_spread(chunk: ScheduledChunk, kv: KVCacheManager, group: str) -> bool:
    """Whether any global block the chunk reads or writes is held by another trunk (its id is past the scratch)."""
    table = kv.table(chunk.seq, group)
    last = -(-(chunk.start + chunk.num_tokens) // kv.block_size)
    home = kv.layout.num_blocks[group]
    return max((b for b in table[:last] if b is not None), default=0) > home


class SpreadAttention:
    """One forward's global-layer exchange: the spread chunks' plan, and every layer's part in the exchange."""

    def __init__(self, cp: ContextParallel, cache: PagedKVCache, rows: torch.Tensor, q_meta: torch.Tensor,
                 home_blocks: torch.Tensor, parts: dict[int, _PeerPart]) -> None:
        self.cp, self.cache = cp, cache
        self.rows = rows  # [R] rows of the step that are spread chunks' tokens
        self.q_meta = q_meta  # [2, R] position, segment
        self.home_blocks = home_blocks  # [3, L] the spread chunks' home blocks
        self.parts = parts
        self._pending: list[Work] = []
        self._replies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def plan(cls, cp: ContextParallel, chunks: Sequence[ScheduledChunk], spread: set[int], kv: KVCacheManager,
             cache: PagedKVCache, group: str, device: torch.device) -> SpreadAttention:
        """The exchange of a step whose chunks `spread` (indices) have global blocks elsewhere."""
        block = kv.block_size
        rows: list[int] = []
        meta: list[tuple[int, int]] = []
        home: list[tuple[int, int, int]] = []
        asked: dict[int, list[int]] = {p: [] for p in cp.peers}
        keys: dict[int, list[tuple[int, int, int]]] = {p: [] for p in cp.peers}
        writes: dict[int, tuple[list[int], list[int]]] = {p: ([], []) for p in cp.peers}
        row = 0
        for index, chunk in enumerate(chunks):
            first, end = chunk.start, chunk.start + chunk.num_tokens
            if index not in spread:
                row += chunk.num_tokens
                continue
            segment = len(rows)  # unique per chunk within the step
            spread_rows = range(len(rows), len(rows) + chunk.num_tokens)
            rows += range(row, row + chunk.num_tokens)
            meta += [(p, segment) for p in range(first, end)]
            table = kv.table(chunk.seq, group)
            holders = set()
            for i, block_id in enumerate(table[: -(-end // block)]):
                assert block_id is not None, "a global table holds every block"
                trunk, local = cp.blocks.holder(block_id)
                (home if trunk == cp.link.rank else keys[trunk]).append((local, i * block, segment))
                holders.add(trunk)
            for p in range(first, end):
                trunk, local = cp.blocks.holder(table[p // block])  # type: ignore[arg-type]
                if trunk != cp.link.rank:
                    writes[trunk][0].append(row + p - first)
                    writes[trunk][1].append(local * block + p % block)
            for trunk in holders - {cp.link.rank}:
                asked[trunk] += spread_rows
            row += chunk.num_tokens

        def ints(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(device)

        def columns(records: Sequence[tuple[int, ...]], width: int) -> torch.Tensor:
            """Records of `width` ints -> [width, len] (built whole: a transposed view is not laid out to send)."""
            return torch.tensor([list(c) for c in zip(*records, strict=True)] if records else [[]] * width,
                                dtype=torch.long).to(device)

        parts = {p: _PeerPart(ints(asked[p]), columns(keys[p], 3), ints(writes[p][0]), ints(writes[p][1]))
                 for p in cp.peers}
        return cls(cp, cache, ints(rows), columns(meta, 2), columns(home, 3), parts)

    # --- a global layer ---------------------------------------------------------------------------------------------
    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Ship every peer its rows and queries, keep what the peers ship here, answer their queries; the answers to
        ours are then in flight (`finish` waits for them). The step's own k/v are written already."""
        with _exchanging():
            self._start(layer, q, k, v)

    def _start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        requests = {p: self._request(part, q, k, v) for p, part in self.parts.items()}
        incoming = self._exchange(layer, requests)
        works: list[Work] = []
        for request in incoming.values():
            self.cache.write(layer, request.write_slots, request.writes[0], request.writes[1])
        for peer, request in incoming.items():
            if request.q.shape[0]:
                out, lse = self._answer(layer, request)
                works += [self.cp.link.send(out, peer, tag(layer, Purpose.OUT)),
                          self.cp.link.send(lse, peer, tag(layer, Purpose.LSE))]
        self._replies = {}
        for peer, part in self.parts.items():
            asked = part.queries.shape[0]
            if asked:
                out = torch.empty(asked, self.cp.heads, self.cp.head_dim, device=q.device)
                lse = torch.empty(asked, self.cp.heads, device=q.device)
                self._replies[peer] = (out, lse)
                works += [self.cp.link.recv(out, peer, tag(layer, Purpose.OUT)),
                          self.cp.link.recv(lse, peer, tag(layer, Purpose.LSE))]
        self._pending = works

    def finish(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> None:
        """The spread rows' attention into out [N, Q, D]: home part merged with the peers' answers."""
        if not self.rows.numel():
            with _exchanging():
                self._wait(self._pending)  # only our answers to the peers
            return
        parts = [self._attend(layer, q.index_select(0, self.rows), self.q_meta, self.home_blocks)]  # q [R, N, D]
        with _exchanging():
            self._wait(self._pending)
        for peer, (answer, lse) in self._replies.items():
            index = self.parts[peer].queries
            full_out = answer.new_zeros(self.rows.shape[0], *answer.shape[1:])  # [R, N, D]
            full_lse = lse.new_full((self.rows.shape[0], lse.shape[1]), float("-inf"))  # [R, N]
            parts.append((full_out.index_copy_(0, index, answer), full_lse.index_copy_(0, index, lse)))
        out.index_copy_(0, self.rows, merge_partials(parts).to(out.dtype))

    # --- inside -----------------------------------------------------------------------------------------------------
    def _request(self, part: _PeerPart, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _Request:
        rows = self.rows.index_select(0, part.queries)
        return _Request(q.index_select(0, rows).contiguous(), self.q_meta.index_select(1, part.queries).contiguous(),
                        part.key_blocks, torch.stack([k.index_select(0, part.write_rows),
                                                      v.index_select(0, part.write_rows)]).contiguous(),
                        part.write_slots)

    def _attend(self, layer: int, q: torch.Tensor, q_meta: torch.Tensor,
                key_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [Q, N, D] at (position, segment) q_meta [2, Q] over the blocks [3, L] held here -> partial
        (out [Q, N, D], lse [Q, N]) float32; MAX_KEYS keys at a time, so the scores stay [N, Q, MAX_KEYS]."""
        per = max(1, MAX_KEYS // self.cache.block_size)
        pieces = [self._attend_piece(layer, q, q_meta, key_blocks[:, i : i + per])
                  for i in range(0, max(key_blocks.shape[1], 1), per)]
        return pieces[0] if len(pieces) == 1 else combine_partials(pieces)

    def _attend_piece(self, layer: int, q: torch.Tensor, q_meta: torch.Tensor,
                      key_blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.cache.block_size
        offsets = torch.arange(block, device=q.device)
        slots = (key_blocks[0, :, None] * block + offsets).flatten()  # [L*B]
        positions = (key_blocks[1, :, None] + offsets).flatten()  # [L*B]
        segments = key_blocks[2].repeat_interleave(block)  # [L*B]
        keys, values = self.cache.read(layer, slots)  # [L*B, K, D]
        visible = (segments[None, :] == q_meta[1, :, None]) & (positions[None, :] <= q_meta[0, :, None])  # [Q, L*B]
        return attend_partial_masked(q, keys, values, visible)

    def _answer(self, layer: int, request: _Request) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self._attend(layer, request.q, request.q_meta, request.key_blocks)
        return out.contiguous(), lse.contiguous()

    def _exchange(self, layer: int, requests: dict[int, _Request]) -> dict[int, _Request]:
        """Headers, then the payloads they announce, with every peer: what each peer sends this trunk."""
        cp, device = self.cp, self.cache.k[0].device
        headers = {p: torch.empty(3, dtype=torch.int64, device=device) for p in cp.peers}
        works = [cp.link.send(requests[p].header(), p, tag(layer, Purpose.HEADER)) for p in cp.peers]
        works += [cp.link.recv(headers[p], p, tag(layer, Purpose.HEADER)) for p in cp.peers]
        self._wait(works)
        incoming = {p: self._receiving(headers[p].tolist(), device) for p in cp.peers}
        works = []
        for p in cp.peers:
            for (sent, purpose), (received, _) in zip(requests[p].payload(), incoming[p].payload(), strict=True):
                works += [cp.link.send(sent, p, tag(layer, purpose))] if sent.numel() else []
                works += [cp.link.recv(received, p, tag(layer, purpose))] if received.numel() else []
        self._wait(works)
        return incoming

    def _receiving(self, header: list[int], device: torch.device) -> _Request:
        queries, blocks, writes = header
        cp = self.cp
        return _Request(torch.empty(queries, cp.heads, cp.head_dim, dtype=cp.dtype, device=device),
                        torch.empty(2, queries, dtype=torch.int64, device=device),
                        torch.empty(3, blocks, dtype=torch.int64, device=device),
                        torch.empty(2, writes, cp.kv_heads, cp.head_dim, dtype=cp.dtype, device=device),
                        torch.empty(writes, dtype=torch.int64, device=device))

    def _wait(self, works: list[Work]) -> None:
        for work in works:
            self.cp.link.wait(work, timeout_s=self.cp.timeout_s)


@contextmanager
def _exchanging() -> Iterator[None]:
    """A failed link (a trunk gone, or late past the timeout) is a step error that no wait cures: the group is broken,
    the replica restarts, and the gateway continues its requests elsewhere."""
    try:
        yield
    except RuntimeError as err:
        raise HerdError(Code.UNAVAILABLE, f"a trunk of this replica failed in the context-parallel exchange: {err}",
                        reason=EXPERTS_LOST) from err
