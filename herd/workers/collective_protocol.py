"""The messages of a replica's collective group: what the trunk and its shards exchange, in which order.

Legend: E experts of the model, M trunks (ranks 0..M-1; M = 1 but in an M:N layout), N shards (ranks M..M+N-1),
HS = 3 + E int64s per header.

Trunk and shard talk point to point, each kind of message under its own tag, in this order (with one trunk; M
trunks below):

- Once, on joining: each shard sends the trunk its `ShardInfo` (hidden size, dtype, experts held).
- A layer step, to each shard with rows this layer (others hear nothing): one message of the header (STEP, layer,
  its counts per held expert) and up to `inline_rows` of its rows (grouped by expert in the shard's order), the
  rest of its rows in a second message if there are more; the shard sends its outputs back.
- A layer step with LoRA (some resident adapter covers the layer's routed experts): the same, under op LORA_STEP,
  and then the rows' row slots [R_s] int64 (each row's bank slot + 1, 0: the base model) in a message of their own.
- An adapter, to every shard: a header (ADAPTER, payload length), the payload ([action, slot, slots, max_rank]
  and the adapter directory's path as UTF-8 bytes, one per int64; action: herd.workers.shard_experts'
  AdapterAction, load, unload or check); each shard does it (reading the adapter from the path) and acks 1, or 0
  when it cannot (the reason in its log).
- A re-placement (expert balancing), to every shard: a header (PLACE, payload length), the payload (old and new
  placements as herd.workers.placement's ints); then per MoE layer one all_to_all of the whole group in which the
  shards swap the moved experts' weights (the trunk takes part with nothing); then each shard's ack.
- Stop, to every shard: a header (STOP); shards leave their loop.

With M trunks (issue 28's M:N, in lockstep): every shard sends its ShardInfo to every trunk. Each MoE layer step,
every trunk sends EVERY shard a header (STEP or LORA_STEP, the layer, its counts: zeros where it has no rows for
that shard; a trunk with nothing to run sends such a header for every MoE layer in order, `idle_step`); its rows,
row slots and the outputs back travel only where it sent rows. The shard reads trunk 0's header, then (a step)
trunks 1..M-1's in rank order, requires them to be steps of the same layer, computes all their rows in one call
and sends each trunk its outputs. Adapters and stop come from trunk 0 only (the others' headers are read only for a
step); re-placement is one trunk's only.

Every header goes in a message of one fixed size (`message_bytes`), with room for a decode step's rows: a shard
always has the receive for the next one posted, so the message lands at once. A receive posted only after the
sender has started (the rows of a large step) costs gloo a round trip more: the receiver says it is ready, then
the bytes come (measured: rows inline took a layer step's round trip from 4 such hops to 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

HEADER_FIELDS = 3  # op, argument, length of the values that follow


class Tag(IntEnum):
    """Each kind of message's tag, so a receive never takes another kind's bytes."""

    HEADER = 1
    ROWS = 2
    OUTPUTS = 3
    INFO = 4
    PAYLOAD = 5
    ACK = 6
    SLOTS = 7


class Op(IntEnum):
    STOP = 0
    STEP = 1  # argument: the MoE layer; values: rows per held expert
    PLACE = 2  # argument: payload length
    LORA_STEP = 3  # as STEP; the rows' row slots follow
    ADAPTER = 4  # argument: payload length


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Compute dtypes by their code in a ShardInfo."""


INLINE_BYTES = 64 * 1024
"""Bytes of rows a header message carries (at least one row): a decode step's rows of a shard on the tiny and
CPU sizes, a few rows of Scout's."""


def adapter_payload(action: int, slot: int, path: str, slots: int, max_rank: int) -> list[int]:
    """An ADAPTER message's payload ints."""
    return [action, slot, slots, max_rank, *path.encode()]


def read_adapter_payload(values: list[int]) -> tuple[int, int, str, int, int]:
    """(action, slot, path, slots, max_rank) of an ADAPTER payload."""
    action, slot, slots, max_rank = values[:4]
    return action, slot, bytes(values[4:]).decode(), slots, max_rank


def header_size(num_experts: int) -> int:
    return HEADER_FIELDS + num_experts


def inline_rows(hidden_size: int, dtype: torch.dtype) -> int:
    """Rows a header message carries."""
    return max(1, INLINE_BYTES // (hidden_size * dtype.itemsize))


def message_bytes(num_experts: int, hidden_size: int, dtype: torch.dtype) -> int:
    """The size of every header message: the header's int64s, then room for inline_rows rows."""
    return 8 * header_size(num_experts) + inline_rows(hidden_size, dtype) * hidden_size * dtype.itemsize


def header_part(message: torch.Tensor, num_experts: int) -> torch.Tensor:
    """A message's header ints (a view): [HS] int64."""
    return message[: 8 * header_size(num_experts)].view(torch.int64)


def rows_part(message: torch.Tensor, num_experts: int, rows: int, hidden_size: int, dtype: torch.dtype,
              ) -> torch.Tensor:
    """The first `rows` inline rows of a message (a view): [rows, H]."""
    start = 8 * header_size(num_experts)
    return message[start : start + rows * hidden_size * dtype.itemsize].view(dtype).view(rows, hidden_size)


def header(op: Op, argument: int, values: list[int], num_experts: int) -> list[int]:
    """One header's ints, padded to header_size."""
    if len(values) > num_experts:
        raise ValueError(f"a header holds at most {num_experts} values, got {len(values)}")
    return [int(op), argument, len(values), *values, *[0] * (num_experts - len(values))]


def read_header(values: list[int]) -> tuple[Op, int, list[int]]:
    """(op, argument, values) of a header's ints."""
    op, argument, length = values[:HEADER_FIELDS]
    return Op(op), argument, values[HEADER_FIELDS : HEADER_FIELDS + length]


@dataclass(frozen=True)
class ShardInfo:
    """What a shard tells its trunk on joining."""

    hidden_size: int
    dtype: torch.dtype
    experts: tuple[int, ...]

    def to_ints(self, num_experts: int) -> list[int]:
        return header(Op.STOP, self.hidden_size, [DTYPES.index(self.dtype), *self.experts], num_experts + 1)

    @classmethod
    def from_ints(cls, values: list[int]) -> ShardInfo:
        _, hidden, rest = read_header(values)
        return cls(hidden_size=hidden, dtype=DTYPES[rest[0]], experts=tuple(rest[1:]))


def info_size(num_experts: int) -> int:
    return header_size(num_experts + 1)
