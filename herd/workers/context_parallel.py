"""Context parallelism across a replica's trunks: one sequence's global-layer (NoPE) keys and values may live in
several trunks' memory, and attention over them is computed where they live and merged by the owner (issue 28).

Legend: T this trunk's new tokens, R of them shipped to one peer, Q a peer's queries, S keys held, N query heads,
K key/value heads, D head dim, M trunks.

The invariant: every trunk of the group runs its forwards in lockstep (the M trunks of a replica step together),
and every global layer of every forward is one exchange in which each trunk talks to every other, whether it has
anything to say or not (`idle` is that exchange for a trunk with no tokens this step). Chunked (RoPE) layers never
exchange: their keys stay with the owner, who is the only one that reads them.

The owner decides where its new tokens' global-layer k/v go (`place`: a rank per token, or one for the whole
forward); a peer that once held part of the sequence is asked for its part at every later global layer. Per global
layer `l`, with each peer p, in this order (tags `TAG_BASE + 8 * l + purpose`, so layers never cross):
  1. header  int64 [3]: (Q queries I send, R new k/v rows I ship, fresh: drop what you hold for me first)
     - sent to p and received from p; Q = T when p holds (or is now given) part of my sequence, else 0.
  2. payload (only non-empty tensors; both ends know the sizes from the headers):
     q [Q, N, D] and q positions [Q] int64, then k, v [R, K, D] and their positions [R] int64.
  3. p stores the rows shipped to it (per owner and layer), attends my queries over everything it holds for me
     (herd.model.partial_attention.attend_partial) and answers out [Q, N, D] float32 and lse [Q, N] float32.
The owner merges its own part (the keys it kept) with the answers by their log-sum-exp (merge_partials); a
sequence with no remote part attends exactly as the contiguous cache does. Steps 1-3 post every send and
receive of a step to all peers before waiting on any, so no order of peers can deadlock.

Supported: one sequence per trunk (its forward's tokens are that sequence's; `start_sequence` begins the next one
and tells the peers to drop what they hold for it); any number of trunks and global layers; gloo (NCCL takes the
same calls and buffers on the group's device, untested here; reading the headers' sizes is then one host sync
per global layer, and placement stays host data so it costs none). Not yet: several sequences per
trunk (the header would carry per-sequence query ranges), the engine's paged KV and block tables, and moving the
held parts' memory accounting into the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch._C._distributed_c10d import Work

from herd.model.causal_attention import attend
from herd.model.config import TextConfig
from herd.model.kv_cache import LayerKV
from herd.model.partial_attention import attend_partial, merge_partials
from herd.workers.collective import CollectiveGroup

TAG_BASE = 1 << 16  # clear of the tags other users of a group pick (they use small ones)


class Purpose(IntEnum):
    """What a message of a global layer's exchange carries; part of its tag."""

    HEADER = 0
    QUERIES = 1
    QUERY_POSITIONS = 2
    KEYS = 3
    VALUES = 4
    KEY_POSITIONS = 5
    OUT = 6
    LSE = 7


def tag(layer: int, purpose: Purpose) -> int:
    """The tag of `purpose`'s message at global layer `layer`."""
    return TAG_BASE + 8 * layer + int(purpose)


@dataclass
class Request:
    """What one trunk sends another at one global layer: its queries, and the k/v rows the other is to keep."""

    q: torch.Tensor  # [Q, N, D]
    q_positions: torch.Tensor  # [Q] int64
    k: torch.Tensor  # [R, K, D]
    v: torch.Tensor  # [R, K, D]
    k_positions: torch.Tensor  # [R] int64
    fresh: bool  # the sender began a new sequence: drop what is held for it before keeping these rows

    def header(self) -> torch.Tensor:
        return torch.tensor([self.q.shape[0], self.k.shape[0], int(self.fresh)], dtype=torch.int64,
                            device=self.q.device)  # [3]


_PAYLOAD = (Purpose.QUERIES, Purpose.QUERY_POSITIONS, Purpose.KEYS, Purpose.VALUES, Purpose.KEY_POSITIONS)


def _payload(request: Request) -> tuple[torch.Tensor, ...]:
    """A request's tensors in the order of _PAYLOAD."""
    return request.q, request.q_positions, request.k, request.v, request.k_positions


class ContextParallelKV:
    """A KVContext for one trunk of M: its own sequence's keys (chunked layers whole, global layers the rows it
    kept) and the global-layer rows it holds for its peers' sequences."""

    def __init__(self, group: CollectiveGroup, config: TextConfig, *, dtype: torch.dtype,
                 timeout_s: float | None = None) -> None:
        self.group, self.rank, self.timeout_s, self.device = group, group.rank, timeout_s, group.device
        self.peers = [p for p in range(group.world_size) if p != group.rank]
        layers = config.num_hidden_layers
        self.global_layers = tuple(i for i in range(layers) if config.chunk_size(i) is None)
        self.heads, self.kv_heads, self.head_dim, self.dtype = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim, dtype)
        self.own = [LayerKV() for _ in range(layers)]  # this trunk's sequence, what it keeps itself
        self.held = {p: {i: LayerKV() for i in self.global_layers} for p in self.peers}  # peers' rows kept here
        self.remote: set[int] = set()  # peers holding part of this trunk's sequence
        self._holders: int | torch.Tensor = self.rank
        self._fresh: set[int] = set()  # global layers yet to tell the peers a new sequence began

    def start_sequence(self) -> None:
        """Forget this trunk's sequence; the next exchange of each global layer has the peers drop their parts."""
        self.own = [LayerKV() for _ in self.own]
        self.remote.clear()
        self._fresh = set(self.global_layers)

    def place(self, holders: int | torch.Tensor) -> None:
        """Where the next forwards' new tokens' global-layer k/v are kept: a rank for all of them, or a rank per
        token [T] (this trunk's own rank: here). Holds until placed again."""
        ranks = torch.as_tensor(holders, device="cpu")
        if ((ranks < 0) | (ranks >= self.group.world_size)).any():
            raise ValueError(f"holders {ranks.tolist()} are outside the group's ranks 0..{self.group.world_size - 1}")
        self._holders = holders

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               chunk_size: int | None) -> torch.Tensor:
        """KVContext.attend: chunked layers locally; global layers through the exchange with every peer."""
        if chunk_size is not None:
            keys, values, key_positions = self.own[layer].append(k, v, positions)
            return attend(q, keys, values, positions, key_positions, chunk_size)
        return self._attend_global(layer, q, k, v, positions, self._holders)

    def idle(self) -> None:
        """Take part in one forward's exchanges without tokens of this trunk's own (peers still get answers)."""
        q = torch.empty(0, self.heads, self.head_dim, dtype=self.dtype, device=self.device)
        kv = torch.empty(0, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device)
        for layer in self.global_layers:
            self._attend_global(layer, q, kv, kv, torch.empty(0, dtype=torch.int64, device=self.device), self.rank)

    def _attend_global(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       positions: torch.Tensor, placed: int | torch.Tensor) -> torch.Tensor:
        positions = positions.to(torch.int64)
        holders = torch.as_tensor(placed, device="cpu").to(torch.int64)  # placement is host data: no syncs
        if holders.dim() and holders.shape != positions.shape:
            raise ValueError(f"placed {holders.shape[0]} holders for a forward of {positions.shape[0]} tokens")
        holders = holders.expand(positions.shape[0])  # [T]
        keep = (holders == self.rank).to(q.device, non_blocking=True)
        keys, values, key_positions = self.own[layer].append(k[keep], v[keep], positions[keep])
        fresh = layer in self._fresh
        self._fresh.discard(layer)
        requests = {}
        for peer in self.peers:
            on_host = holders == peer
            if bool(on_host.any()):
                self.remote.add(peer)
            ship = on_host.to(q.device, non_blocking=True)
            rows = q.shape[0] if peer in self.remote else 0
            requests[peer] = Request(q[:rows].contiguous(), positions[:rows].contiguous(), k[ship].contiguous(),
                                     v[ship].contiguous(), positions[ship].contiguous(), fresh)
        incoming = self._exchange_requests(layer, requests)
        answers = {peer: self._answer(peer, layer, incoming[peer]) for peer in self.peers}
        replies = self._exchange_answers(layer, answers, {p: requests[p].q.shape[0] for p in self.peers})
        remote = [replies[p] for p in self.peers if requests[p].q.shape[0] > 0]
        if not remote:  # nothing elsewhere: exactly the contiguous cache's arithmetic
            return attend(q, keys, values, positions, key_positions, None)
        mine = attend_partial(q, keys, values, positions, key_positions, None)
        return merge_partials([mine, *remote]).to(q.dtype)  # [T, N, D]

    def _answer(self, peer: int, layer: int, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep `peer`'s shipped rows, then its queries' partial attention over all this trunk holds for it."""
        if request.fresh:
            self.held[peer][layer] = LayerKV()
        held = self.held[peer][layer]
        keys, values, key_positions = held.append(request.k, request.v, request.k_positions)
        if not request.q.shape[0]:
            return (torch.empty(0, self.heads, self.head_dim, device=self.device),
                    torch.empty(0, self.heads, device=self.device))
        return attend_partial(request.q, keys, values, request.q_positions, key_positions, None)

    def _exchange_requests(self, layer: int, requests: dict[int, Request]) -> dict[int, Request]:
        """Steps 1 and 2: headers, then the payloads they announce, with every peer."""
        headers = {p: torch.empty(3, dtype=torch.int64, device=self.device) for p in self.peers}
        works = [self.group.send(requests[p].header(), p, tag(layer, Purpose.HEADER)) for p in self.peers]
        works += [self.group.recv(headers[p], p, tag(layer, Purpose.HEADER)) for p in self.peers]
        self._wait(works)
        incoming = {p: self._receiving(headers[p].tolist()) for p in self.peers}
        works = []
        for p in self.peers:
            for (sent, received), purpose in zip(
                zip(_payload(requests[p]), _payload(incoming[p]), strict=True), _PAYLOAD, strict=True
            ):
                works += [self.group.send(sent, p, tag(layer, purpose))] if sent.numel() else []
                works += [self.group.recv(received, p, tag(layer, purpose))] if received.numel() else []
        self._wait(works)
        return incoming

    def _receiving(self, header: list[int]) -> Request:
        """Empty buffers for the request a peer's header announces."""
        queries, rows, fresh = header
        return Request(torch.empty(queries, self.heads, self.head_dim, dtype=self.dtype, device=self.device),
                       torch.empty(queries, dtype=torch.int64, device=self.device),
                       torch.empty(rows, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device),
                       torch.empty(rows, self.kv_heads, self.head_dim, dtype=self.dtype, device=self.device),
                       torch.empty(rows, dtype=torch.int64, device=self.device), bool(fresh))

    def _exchange_answers(self, layer: int, answers: dict[int, tuple[torch.Tensor, torch.Tensor]],
                          asked: dict[int, int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Step 3: each peer's (out, lse) for the queries it sent here; ours back for the `asked` rows we sent."""
        replies = {p: (torch.empty(asked[p], self.heads, self.head_dim, device=self.device),
                        torch.empty(asked[p], self.heads, device=self.device))
                   for p in self.peers}
        works: list[Work] = []
        for p in self.peers:
            out, lse = answers[p]
            if out.shape[0]:
                works += [self.group.send(out.contiguous(), p, tag(layer, Purpose.OUT)),
                          self.group.send(lse.contiguous(), p, tag(layer, Purpose.LSE))]
            if asked[p]:
                works += [self.group.recv(replies[p][0], p, tag(layer, Purpose.OUT)),
                          self.group.recv(replies[p][1], p, tag(layer, Purpose.LSE))]
        self._wait(works)
        return replies

    def _wait(self, works: list[Work]) -> None:
        for work in works:
            self.group.wait(work, timeout_s=self.timeout_s)
