"""Expert placement: which shard owns which experts of every MoE layer. A pure function.

Experts are split into contiguous, count-balanced ranges (shard s owns about E/S of them), and the
permute order lists them shard by shard, so each shard's rows are one contiguous slice of the permuted
rows. Optionally the hottest experts (by measured per-expert load) get a replica on the least-loaded
other shard; the rows of a replicated expert are then split between its replicas.
herd.workers.balance plans placements from live load; `to_ints`/`from_ints` carry one over a collective
and `validate` checks what the dispatcher relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

MIN_ROWS_PER_COPY = 2
"""A copy of a replicated expert gets at least this many of its rows, unless the expert has fewer."""


def copy_rows(size: int, copy: int, copies: int) -> tuple[int, int]:
    """The rows [start, stop) of an expert's `size` rows (in its run) that its copy number `copy` of `copies`
    computes: an even split, over fewer copies when an even one would leave a copy a single row. A one-row GEMM
    takes another path than a larger one (gemv) and its results differ in the last bits, so a single row would make
    a token's output depend on how its expert was split; from two rows on, a row's result does not depend on how
    many rows share its GEMM (on the CPU kernels; tests/integration/workers/test_collective_transport.py checks
    logits are bit-identical across re-placements)."""
    used = max(1, min(copies, size // MIN_ROWS_PER_COPY))
    if copy >= used:
        return size, size
    return size * copy // used, size * (copy + 1) // used


@dataclass(frozen=True)
class Placement:
    """Owned experts per shard, and the order permute groups experts in."""

    num_experts: int
    shard_experts: tuple[tuple[int, ...], ...]
    """Experts each shard holds (its range and any replicas), ascending: the order counts use."""
    expert_order: tuple[int, ...]
    """Every expert once, shard by shard by primary owner: the order for herd.kernels.permute."""
    replicas: dict[int, tuple[int, ...]]
    """Shards holding each expert, primary first."""

    @property
    def num_shards(self) -> int:
        return len(self.shard_experts)

    def validate(self) -> None:
        """Raise ValueError naming the first thing that makes this placement unusable by the dispatcher."""
        experts, shards = self.num_experts, self.num_shards
        if experts < 1 or shards < 1:
            raise ValueError(f"need at least one expert and one shard, got {experts} and {shards}")
        holding: dict[int, list[int]] = {e: [] for e in range(experts)}
        for shard, held in enumerate(self.shard_experts):
            if not held:
                raise ValueError(f"shard {shard} holds no experts")
            _check_ids(held, experts, f"shard {shard}")
            if any(a >= b for a, b in pairwise(held)):
                raise ValueError(f"shard {shard}'s experts {held} are not ascending (each expert once)")
            for expert in held:
                holding[expert].append(shard)
        for expert, held_by in holding.items():
            if not held_by:
                raise ValueError(f"expert {expert} is held by no shard")
            holders = self.replicas.get(expert, ())
            _check_ids(holders, shards, f"replicas of expert {expert}", noun="shard")
            if len(set(holders)) != len(holders):
                raise ValueError(f"replicas of expert {expert} name a shard twice: {holders}")
            if sorted(holders) != held_by:
                raise ValueError(f"replicas of expert {expert} are {holders}, the shards holding it are "
                                 f"{tuple(held_by)}")
        if set(self.replicas) != set(range(experts)):
            raise ValueError(f"replicas has keys {sorted(self.replicas)}, not the experts 0..{experts - 1}")
        _check_ids(self.expert_order, experts, "expert_order")
        if sorted(self.expert_order) != list(range(experts)):
            raise ValueError(f"expert_order {self.expert_order} is not every expert once")
        primaries = [self.replicas[e][0] for e in self.expert_order]
        if primaries != sorted(primaries):
            raise ValueError(f"expert_order {self.expert_order} is not grouped shard by shard by primary owner "
                             f"(primaries {primaries})")

    def to_ints(self) -> list[int]:
        """A flat list of ints (an int64 tensor's worth) that from_ints reads back: E, S, the expert order,
        then each shard's count and experts, then each expert's count and holders (primary first)."""
        values = [self.num_experts, self.num_shards, *self.expert_order]
        for held in self.shard_experts:
            values += [len(held), *held]
        for expert in range(self.num_experts):
            holders = self.replicas.get(expert, ())
            values += [len(holders), *holders]
        return [int(v) for v in values]

    @classmethod
    def from_ints(cls, values: Sequence[int]) -> Placement:
        """The placement to_ints wrote, validated: ValueError on anything malformed."""
        reader = _Reader([int(v) for v in values])
        if len(reader.values) < 2:
            raise ValueError(f"a placement needs at least 2 values (experts, shards), got {len(reader.values)}: "
                             "too short")
        experts, shards = reader.take(2)
        if experts < 1 or shards < 1:
            raise ValueError(f"need at least one expert and one shard, got {experts} and {shards}")
        order = tuple(reader.take(experts))
        shard_experts = tuple(tuple(reader.take(reader.take(1)[0])) for _ in range(shards))
        replicas = {e: tuple(reader.take(reader.take(1)[0])) for e in range(experts)}
        if reader.at != len(reader.values):
            raise ValueError(f"{len(reader.values) - reader.at} value(s) left over after a placement of "
                             f"{experts} experts on {shards} shards")
        placement = cls(num_experts=experts, shard_experts=shard_experts, expert_order=order, replicas=replicas)
        placement.validate()
        return placement


class _Reader:
    """Reads counted runs off a flat list of ints, saying where it ran out."""

    def __init__(self, values: list[int]) -> None:
        self.values = values
        self.at = 0

    def take(self, count: int) -> list[int]:
        if count < 0 or self.at + count > len(self.values):
            raise ValueError(f"placement values end early: {count} wanted at position {self.at} of "
                             f"{len(self.values)}")
        self.at += count
        return self.values[self.at - count : self.at]


def _check_ids(ids: Sequence[int], limit: int, where: str, *, noun: str = "expert") -> None:
    for value in ids:
        if not 0 <= value < limit:
            raise ValueError(f"{where}: {noun} {value} out of range 0..{limit - 1}")


def place_experts(
    num_experts: int,
    num_shards: int,
    *,
    expert_load: Sequence[float] | None = None,
    replicate_hot: int = 0,
) -> Placement:
    """Balanced contiguous ranges of experts, plus a replica for each of the `replicate_hot` hottest."""
    if num_experts < 1 or num_shards < 1:
        raise ValueError(f"need at least one expert and one shard, got {num_experts} and {num_shards}")
    if num_shards > num_experts:
        raise ValueError(f"{num_shards} shards for {num_experts} experts: some shard would own none")
    if replicate_hot < 0 or (replicate_hot and num_shards < 2):
        raise ValueError(f"replicate_hot must be >= 0 and needs 2+ shards, got {replicate_hot} with {num_shards}")
    if replicate_hot and expert_load is None:
        raise ValueError("replicate_hot needs expert_load to know which experts are hot")
    if expert_load is not None and len(expert_load) != num_experts:
        raise ValueError(f"expert_load has {len(expert_load)} entries for {num_experts} experts")
    base, extra = divmod(num_experts, num_shards)
    owned: list[list[int]] = []
    start = 0
    for shard in range(num_shards):
        size = base + (1 if shard < extra else 0)
        owned.append(list(range(start, start + size)))
        start += size
    replicas: dict[int, tuple[int, ...]] = {e: (s,) for s, experts in enumerate(owned) for e in experts}
    if replicate_hot:
        assert expert_load is not None
        load = [sum(expert_load[e] for e in experts) for experts in owned]
        hottest = sorted(range(num_experts), key=lambda e: (-expert_load[e], e))[:replicate_hot]
        for expert in hottest:
            home = replicas[expert][0]
            target = min((s for s in range(num_shards) if s != home), key=lambda s: (load[s], s))
            owned[target].append(expert)
            replicas[expert] = (home, target)
            half = expert_load[expert] / 2  # the replicas split its rows
            load[home] -= half
            load[target] += half
    order = tuple(e for shard, experts in enumerate(owned) for e in experts if replicas[e][0] == shard)
    return Placement(
        num_experts=num_experts,
        shard_experts=tuple(tuple(sorted(experts)) for experts in owned),
        expert_order=order,
        replicas=replicas,
    )
