"""The messages of a replica's collective group: what the trunk and its shards exchange, in which order.

Legend: E experts of the model, W ranks (trunk 0, shards 1..N), HS = 3 + E int64s per header.

Every message is an all_to_all in which every rank takes part (a rank with nothing to send or take passes zero
rows), so the order below is the protocol:

- Once, on joining: each shard sends the trunk its `ShardInfo` (hidden size, dtype, experts held).
- A layer step: the trunk sends each shard a header (STEP, layer, its counts per held expert), then the shards'
  rows (grouped by expert in each shard's order), and each shard sends its outputs back the same way.
- A re-placement (expert balancing): a header (PLACE, payload length), the payload (old and new placements, as
  herd.workers.placement's ints), then per MoE layer the moved experts' weights between shards, then an ack each.
- Stop: a header (STOP); shards leave their loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

HEADER_FIELDS = 3  # op, argument, length of the values that follow


class Op(IntEnum):
    STOP = 0
    STEP = 1  # argument: the MoE layer; values: rows per held expert
    PLACE = 2  # argument: payload length


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Compute dtypes by their code in a ShardInfo."""


def header_size(num_experts: int) -> int:
    return HEADER_FIELDS + num_experts


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
