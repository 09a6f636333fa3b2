"""Context parallelism in the engine (issue 28): a sequence whose global-layer (NoPE) blocks lie in several trunks'
paged caches attends where its keys are, and the parts merge exactly.

Legend: M trunks, N query heads, K key/value heads, D head dim, B tokens per block, Q query rows asked of a peer,
L key blocks read there, S spread chunks asked of it (segments), W new tokens' k/v it keeps.

The blocks come from the pool the trunks share (herd.engine.shared_blocks): a block id of a trunk's tables says
which trunk holds it. A step's chunks whose global blocks are all home attend as ever (herd.engine.paged_attention);
the others, `spread` chunks, are planned here once per forward (`plan`; herd.engine.spread_index keeps where each
sequence's blocks are, so planning costs what changed, not the context), and at every global layer:
  1. each new token's k/v is written where its block is: home blocks by the step's own write, and for each peer the
     rows it keeps are shipped to it;
  2. the chunk's queries go to every peer that holds any of its blocks; at the forward's first global layer, with
     those blocks (block id there, first position) and how many belong to each chunk (its segment in the request),
     which the peer keeps for the forward's other global layers; the peer writes the rows shipped, reads those
     blocks from its cache and answers each query's partial attention and log-sum-exp (herd.model.partial_attention)
     over them, a query seeing the keys of its own segment up to its own position;
  3. the owner attends the same queries over its home blocks and merges its part with the answers.
The first global layer of every forward is one exchange of each trunk with every other, headers always (lockstep: a
trunk with nothing to ask or answer still says so, as an idle trunk's empty micro-batches do), payloads when the
headers announce them; a pair of trunks with nothing to ask or ship either way then stays quiet for the forward's
other global layers (what a forward asks is the same at every layer), so a replica with no spread sequence pays one
header exchange a forward, not one a global layer. All sends and receives of a phase are posted before any is
waited on, so no order of peers deadlocks. Tags `TAG_BASE + 16 * layer + purpose` keep layers apart; the
micro-batches of one step exchange in the same order on every trunk (herd.model.micro_batch), so their messages
never cross.

The link is the replica's collective group (herd.workers.collective: gloo here, NCCL on GPUs, untested); the trunks
are its ranks 0..M-1. Spread chunks attend with a masked attention in torch (herd.model.partial_attention), in pieces
of keys merged by log-sum-exp (MAX_KEYS keys, MAX_SCORES scores at most), so memory stays bounded at any context; a
fused GPU kernel that returns the log-sum-exp (flash-attention's) would be the fast one, and is not written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

import torch
from torch._C._distributed_c10d import Work

from herd.engine.errors import Code, HerdError
from herd.engine.fault_hold import EXPERTS_LOST
from herd.engine.kv_cache_manager import FULL, KVCacheManager
from herd.engine.paged_kv import PagedKVCache
from herd.engine.scheduler import ScheduledChunk
from herd.engine.spread_index import SpreadIndex
from herd.model.partial_attention import attend_partial_masked, combine_partials, merge_partials

TAG_BASE = 1 << 16  # clear of the small tags the expert transport uses on the same group
MAX_KEYS = 8192
"""Keys one partial attention call reads at most (the others merge by log-sum-exp) ..."""
MAX_SCORES = 1 << 26
"""... and fewer when the queries are many: its scores [N, Q, keys] hold at most this many float32 (256 MiB)."""


class Purpose(IntEnum):
    """What a message of a global layer's exchange carries; part of its tag."""

    HEADER = 0
    QUERIES = 1
    QUERY_META = 2
    KEY_BLOCKS = 3
    KEY_COUNTS = 4
    WRITES = 5
    WRITE_SLOTS = 6
    OUT = 7
    LSE = 8


def tag(layer: int, purpose: Purpose) -> int:
    return TAG_BASE + 16 * layer + int(purpose)


class PeerLink(Protocol):
    """Point-to-point messages between the trunks (herd.workers.collective.CollectiveGroup is one)."""

    rank: int

    def send(self, tensor: torch.Tensor, to: int, tag: int) -> Work: ...

    def recv(self, tensor: torch.Tensor, source: int, tag: int) -> Work: ...

    def wait(self, work: Work, *, timeout_s: float | None = None) -> None: ...


@dataclass
class ContextParallel:
    """One trunk's part in context parallelism: its link to the other trunks (ranks 0..trunks-1), and the index of
    where its sequences' blocks are (over its view of the shared global-layer blocks)."""

    link: PeerLink
    trunks: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    index: SpreadIndex
    timeout_s: float | None = None

    @property
    def peers(self) -> list[int]:
        return [t for t in range(self.trunks) if t != self.link.rank]

    def spread(self, chunks: Sequence[ScheduledChunk], kv: KVCacheManager) -> set[int]:
        """Indices of the chunks whose global blocks are not all at home."""
        self.index.forget_finished()
        return {i for i, chunk in enumerate(chunks)
                if self.index.trunks(chunk.seq, kv.table(chunk.seq, FULL)) - {self.link.rank}}


@dataclass
class _Keys:
    """Blocks one side attends over, by segment: [2, L] (block id, first position) and blocks per segment [S]."""

    blocks: torch.Tensor
    counts: torch.Tensor

    def expand(self, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every key's cache slot, position and segment [L*B] each."""
        offsets = torch.arange(block, device=self.blocks.device)
        slots = (self.blocks[0, :, None] * block + offsets).flatten()
        positions = (self.blocks[1, :, None] + offsets).flatten()
        segments = torch.repeat_interleave(torch.arange(self.counts.shape[0], device=self.counts.device),
                                           self.counts * block)
        return slots, positions, segments


@dataclass
class _PeerPart:
    """What one forward asks of one peer."""

    queries: torch.Tensor  # [Q] indices into the spread rows
    q_meta: torch.Tensor  # [2, Q] position, segment (the chunk's index among those asked of this peer)
    keys: _Keys
    write_rows: torch.Tensor  # [W] rows of the step whose k/v the peer keeps
    write_slots: torch.Tensor  # [W] their slots in the peer's cache


@dataclass
class _Request:
    """One global layer's message from one trunk to another (sent, or received into)."""

    q: torch.Tensor  # [Q, N, D]
    q_meta: torch.Tensor  # [2, Q] int64: position, segment
    key_blocks: torch.Tensor  # [2, L] int64 (L 0 past the forward's first global layer)
    key_counts: torch.Tensor  # [S] int64 (likewise)
    writes: torch.Tensor  # [2, W, K, D]: keys, values
    write_slots: torch.Tensor  # [W] int64

    def header(self) -> torch.Tensor:
        sizes = [self.q.shape[0], self.key_blocks.shape[1], self.key_counts.shape[0], self.write_slots.shape[0]]
        return torch.tensor(sizes, dtype=torch.int64, device=self.q.device)  # [4]

    def payload(self) -> list[tuple[torch.Tensor, Purpose]]:
        return [(self.q, Purpose.QUERIES), (self.q_meta, Purpose.QUERY_META), (self.key_blocks, Purpose.KEY_BLOCKS),
                (self.key_counts, Purpose.KEY_COUNTS), (self.writes, Purpose.WRITES),
                (self.write_slots, Purpose.WRITE_SLOTS)]


@dataclass
class _Plan:
    """A forward's spread chunks laid out: what the owner attends at home and asks of each peer."""

    rows: list[int] = field(default_factory=list)  # step rows of the spread chunks' tokens
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)  # each row's chunk, among the spread ones
    home: list[torch.Tensor] = field(default_factory=list)  # each spread chunk's home blocks [2, L]
    asked: dict[int, list[tuple[range, torch.Tensor]]] = field(default_factory=dict)  # peer: (spread rows, blocks)
    writes: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)  # peer: (step rows, slots there)


class SpreadAttention:
    """One forward's global-layer exchange: the spread chunks' plan, and every layer's part in the exchange."""

    def __init__(self, cp: ContextParallel, cache: PagedKVCache, rows: torch.Tensor, q_meta: torch.Tensor,
                 home: _Keys, parts: dict[int, _PeerPart]) -> None:
        self.cp, self.cache = cp, cache
        self.rows = rows  # [R] rows of the step that are spread chunks' tokens
        self.q_meta = q_meta  # [2, R] position, segment
        self.home = home
        self.parts = parts
        self._first = True  # the forward's first global layer: the blocks travel with it
        self._active = cp.peers  # peers exchanged with: after the first global layer, those with anything to say
        self._home_keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._peer_keys: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # what each peer asks of us
        self._pending: list[Work] = []
        self._replies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def plan(cls, cp: ContextParallel, chunks: Sequence[ScheduledChunk], spread: set[int], kv: KVCacheManager,
             cache: PagedKVCache, device: torch.device) -> SpreadAttention:
        """The exchange of a forward whose chunks `spread` (indices) have global blocks elsewhere."""
        block, plan = kv.block_size, _Plan(asked={p: [] for p in cp.peers}, writes={p: ([], []) for p in cp.peers})
        row = 0
        for index, chunk in enumerate(chunks):
            first, end = chunk.start, chunk.start + chunk.num_tokens
            if index in spread:
                table = kv.table(chunk.seq, FULL)
                held = cp.index.blocks(chunk.seq, table)
                spread_rows = range(len(plan.rows), len(plan.rows) + chunk.num_tokens)
                plan.segments += [len(plan.home)] * chunk.num_tokens
                plan.rows += range(row, row + chunk.num_tokens)
                plan.positions += range(first, end)
                plan.home.append(held.get(cp.link.rank, torch.empty(2, 0, dtype=torch.long, device=device)))
                for trunk, blocks in held.items():
                    if trunk != cp.link.rank:
                        plan.asked[trunk].append((spread_rows, blocks))
                for p in range(first, end):  # the new tokens (a few): where each one's k/v goes
                    trunk, local = cp.index.view.holder(table[p // block])  # type: ignore[arg-type]
                    if trunk != cp.link.rank:
                        plan.writes[trunk][0].append(row + p - first)
                        plan.writes[trunk][1].append(local * block + p % block)
            row += chunk.num_tokens
        return cls(cp, cache, _ints(plan.rows, device), _ints([plan.positions, plan.segments], device),
                   _keys(plan.home, device), {p: _peer_part(plan, p, device) for p in cp.peers})

    # --- a global layer ---------------------------------------------------------------------------------------------
    def start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Ship every peer its rows and queries, keep what the peers ship here, answer their queries; the answers to
        ours are then in flight (`finish` waits for them). The step's own k/v are written already."""
        with _exchanging():
            self._start(layer, q, k, v)
        self._first = False

    def _start(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        requests = {p: self._request(self.parts[p], q, k, v) for p in self._active}
        incoming = self._exchange(layer, requests)
        if self._first:  # a pair with nothing either way this forward is quiet for its other global layers
            self._active = [p for p in self._active if _says_anything(requests[p]) or _says_anything(incoming[p])]
        works: list[Work] = []
        for request in incoming.values():
            self.cache.write(layer, request.write_slots, request.writes[0], request.writes[1])
        for peer, request in incoming.items():
            if self._first:
                self._peer_keys[peer] = _Keys(request.key_blocks, request.key_counts).expand(self.cache.block_size)
            if request.q.shape[0]:
                out, lse = self._attend(layer, request.q, request.q_meta, self._peer_keys[peer])
                works += [self.cp.link.send(out.contiguous(), peer, tag(layer, Purpose.OUT)),
                          self.cp.link.send(lse.contiguous(), peer, tag(layer, Purpose.LSE))]
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
        if self._home_keys is None:
            self._home_keys = self.home.expand(self.cache.block_size)
        parts = [self._attend(layer, q.index_select(0, self.rows), self.q_meta, self._home_keys)]  # q [R, N, D]
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
        keys = part.keys if self._first else _Keys(part.keys.blocks[:, :0], part.keys.counts[:0])
        return _Request(q.index_select(0, rows).contiguous(), part.q_meta, keys.blocks, keys.counts,
                        torch.stack([k.index_select(0, part.write_rows),
                                     v.index_select(0, part.write_rows)]).contiguous(), part.write_slots)

    def _attend(self, layer: int, q: torch.Tensor, q_meta: torch.Tensor,
                keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [Q, N, D] at (position, segment) q_meta [2, Q] over the keys (slot, position, segment) [S] each
        held here -> partial (out [Q, N, D], lse [Q, N]) float32; in pieces (MAX_KEYS keys, MAX_SCORES scores)."""
        slots, positions, segments = keys
        per = max(1, min(MAX_KEYS, MAX_SCORES // max(1, q.shape[0] * q.shape[1])))
        pieces = []
        for i in range(0, max(slots.shape[0], 1), per):
            piece = slice(i, i + per)
            k, v = self.cache.read(layer, slots[piece])  # [S, K, D]
            visible = (segments[None, piece] == q_meta[1, :, None]) & (positions[None, piece] <= q_meta[0, :, None])
            pieces.append(attend_partial_masked(q, k, v, visible))  # visible [Q, S]
        return pieces[0] if len(pieces) == 1 else combine_partials(pieces)

    def _exchange(self, layer: int, requests: dict[int, _Request]) -> dict[int, _Request]:
        """Headers, then the payloads they announce, with every peer: what each peer sends this trunk."""
        cp, device, peers = self.cp, self.cache.k[0].device, list(requests)
        headers = {p: torch.empty(4, dtype=torch.int64, device=device) for p in peers}
        works = [cp.link.send(requests[p].header(), p, tag(layer, Purpose.HEADER)) for p in peers]
        works += [cp.link.recv(headers[p], p, tag(layer, Purpose.HEADER)) for p in peers]
        self._wait(works)
        incoming = {p: self._receiving(headers[p].tolist(), device) for p in peers}
        works = []
        for p in peers:
            for (sent, purpose), (received, _) in zip(requests[p].payload(), incoming[p].payload(), strict=True):
                works += [cp.link.send(sent, p, tag(layer, purpose))] if sent.numel() else []
                works += [cp.link.recv(received, p, tag(layer, purpose))] if received.numel() else []
        self._wait(works)
        return incoming

    def _receiving(self, header: list[int], device: torch.device) -> _Request:
        queries, blocks, segments, writes = header
        cp = self.cp
        return _Request(torch.empty(queries, cp.heads, cp.head_dim, dtype=cp.dtype, device=device),
                        torch.empty(2, queries, dtype=torch.int64, device=device),
                        torch.empty(2, blocks, dtype=torch.int64, device=device),
                        torch.empty(segments, dtype=torch.int64, device=device),
                        torch.empty(2, writes, cp.kv_heads, cp.head_dim, dtype=cp.dtype, device=device),
                        torch.empty(writes, dtype=torch.int64, device=device))

    def _wait(self, works: list[Work]) -> None:
        for work in works:
            self.cp.link.wait(work, timeout_s=self.cp.timeout_s)


def _says_anything(request: _Request) -> bool:
    """Whether a request asks queries or ships rows (its blocks alone ask nothing)."""
    return bool(request.q.shape[0] or request.write_slots.shape[0])


def _ints(values: Sequence[object], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device)


def _keys(blocks: list[torch.Tensor], device: torch.device) -> _Keys:
    """Each segment's blocks [2, L_s] as one request's keys (a new tensor: laid out to send)."""
    if not blocks:
        return _Keys(torch.empty(2, 0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long,
                                                                                      device=device))
    return _Keys(torch.cat(blocks, dim=1), _ints([b.shape[1] for b in blocks], device))


def _peer_part(plan: _Plan, peer: int, device: torch.device) -> _PeerPart:
    """What the plan asks of `peer`: the rows of the chunks it holds blocks of, each chunk its own segment."""
    asked = plan.asked[peer]
    queries = [r for rows, _ in asked for r in rows]
    meta = [[plan.positions[r] for r in queries], [s for s, (rows, _) in enumerate(asked) for _ in rows]]
    rows, slots = plan.writes[peer]
    return _PeerPart(_ints(queries, device), _ints(meta, device), _keys([b for _, b in asked], device),
                     _ints(rows, device), _ints(slots, device))


@contextmanager
def _exchanging() -> Iterator[None]:
    """A failed link (a trunk gone, or late past the timeout) is a step error that no wait cures: the group is broken,
    the replica restarts, and the gateway continues its requests elsewhere."""
    try:
        yield
    except RuntimeError as err:
        raise HerdError(Code.UNAVAILABLE, f"a trunk of this replica failed in the context-parallel exchange: {err}",
                        reason=EXPERTS_LOST) from err
