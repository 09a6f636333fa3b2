"""Expert placement: which shard owns which experts of every MoE layer. A pure function.

Experts are split into contiguous, count-balanced ranges (shard s owns about E/S of them), and the
permute order lists them shard by shard, so each shard's rows are one contiguous slice of the permuted
rows. Optionally the hottest experts (by measured per-expert load) get a replica on the least-loaded
other shard; the rows of a replicated expert are then split between its replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
