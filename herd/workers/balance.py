"""Live expert balancing (EPLB): plan a placement from measured expert load, and the weight copies to reach it.

Pure functions: no torch.distributed, no I/O. The caller measures load (herd.workers.expert_load), plans here,
agrees on the plan over a collective (Placement.to_ints / from_ints) and copies the weights `transfers` lists.

The invariant every function here keeps: a shard's work in a layer step is the rows it computes, and a
replicated expert's rows are split between its copies exactly as ExpertDispatcher._slices splits them
(herd.workers.placement.copy_rows: evenly, but never one row to a copy of an expert with more). Planning
minimises the slowest shard's expected rows, the step's critical path; `shard_rows` counts them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from herd.workers.placement import Placement, copy_rows


@dataclass(frozen=True)
class Transfer:
    """Copy one expert's weights from a shard that holds them to one that will."""

    expert: int
    source: int
    target: int


def plan_placement(expert_load: Sequence[float], num_shards: int, *, slots_per_shard: int) -> Placement:
    """Place and replicate experts so that the slowest shard's expected rows are as low as a greedy makes them.

    Every spare slot goes, one at a time, to the expert with the highest load per copy (at most one copy per
    shard); then experts, heaviest load per copy first (ties by id), put their copies on the least-loaded
    shards with a free slot (ties: fewer experts held, then lower id). The first of an expert's shards is its
    primary owner.
    """
    _check_load(expert_load)
    experts = len(expert_load)
    if num_shards < 1:
        raise ValueError(f"need at least one shard, got {num_shards}")
    if slots_per_shard * num_shards < experts:
        raise ValueError(f"{slots_per_shard} slots on each of {num_shards} shards hold "
                         f"{max(0, slots_per_shard * num_shards)} experts, not {experts}")
    copies = _copies(expert_load, num_shards, slots_per_shard)
    load = [0.0] * num_shards
    held: list[list[int]] = [[] for _ in range(num_shards)]
    replicas: dict[int, tuple[int, ...]] = {}
    for expert in sorted(range(experts), key=lambda e: (-expert_load[e] / copies[e], e)):
        free = sorted((s for s in range(num_shards) if len(held[s]) < slots_per_shard),
                      key=lambda s: (load[s], len(held[s]), s))
        # Not seen short in 20,000 random plans; if it were, fewer copies stay valid (rows split over those placed).
        chosen = free[: copies[expert]]
        for shard in chosen:
            held[shard].append(expert)
            load[shard] += expert_load[expert] / len(chosen)
        replicas[expert] = tuple(chosen)
    order = tuple(e for shard in range(num_shards) for e in sorted(held[shard]) if replicas[e][0] == shard)
    return Placement(num_experts=experts, shard_experts=tuple(tuple(sorted(h)) for h in held),
                     expert_order=order, replicas=dict(sorted(replicas.items())))


def _copies(expert_load: Sequence[float], num_shards: int, slots_per_shard: int) -> list[int]:
    """Copies per expert: one each, then every spare slot to the highest load per copy (ties by id)."""
    experts = len(expert_load)
    copies = [1] * experts
    spare = min(slots_per_shard * num_shards, experts * num_shards) - experts
    for _ in range(spare):
        expert = min((e for e in range(experts) if copies[e] < num_shards),
                     key=lambda e: (-expert_load[e] / copies[e], e))
        copies[expert] += 1
    return copies


def expected_shard_rows(placement: Placement, expert_load: Sequence[float]) -> list[float]:
    """Each shard's expected rows for a load: an expert's load split evenly over its copies."""
    if len(expert_load) != placement.num_experts:
        raise ValueError(f"{len(expert_load)} loads for {placement.num_experts} experts")
    return [sum(expert_load[e] / len(placement.replicas[e]) for e in held) for held in placement.shard_experts]


def shard_rows(placement: Placement, expert_rows: Sequence[int]) -> list[int]:
    """Rows each shard computes in one layer step, given rows per expert id, by the dispatcher's split."""
    if len(expert_rows) != placement.num_experts:
        raise ValueError(f"{len(expert_rows)} row counts for {placement.num_experts} experts")
    rows = [0] * placement.num_shards
    for shard, held in enumerate(placement.shard_experts):
        for expert in held:
            holders = placement.replicas[expert]
            start, stop = copy_rows(expert_rows[expert], holders.index(shard), len(holders))
            rows[shard] += stop - start
    return rows


def transfers(old: Placement, new: Placement) -> list[Transfer]:
    """The weight copies that take shards from `old` to `new`: one per expert a shard gains, from a shard that
    held it in `old` (the one sending least so far, then the lowest id), by expert then target."""
    if (old.num_experts, old.num_shards) != (new.num_experts, new.num_shards):
        raise ValueError(f"cannot move from {old.num_experts} experts on {old.num_shards} shards to "
                         f"{new.num_experts} experts on {new.num_shards}")
    sends = [0] * old.num_shards
    moves = []
    gained = sorted((e, target) for target, held in enumerate(new.shard_experts)
                    for e in set(held) - set(old.shard_experts[target]))
    for expert, target in gained:
        source = min(old.replicas[expert], key=lambda s: (sends[s], s))
        sends[source] += 1
        moves.append(Transfer(expert=expert, source=source, target=target))
    return moves


def rebalance(expert_load: Sequence[float], current: Placement, *, slots_per_shard: int,
              min_gain: float = 0.1, layer_loads: Sequence[Sequence[float]] | None = None) -> Placement | None:
    """The placement planned from `expert_load` when it lowers the slowest shard's expected rows by at least
    `min_gain` (a fraction of today's), else None: a smaller gain is not worth the weight copies. With
    `layer_loads` (each MoE layer's load, summing to `expert_load`) the gain is judged layer by layer, the mean
    over layers of each layer's slowest shard: one placement serves every layer, and a plan that balances their
    sum can leave a layer whose hot experts differ from the others' worse off than today."""
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain is a fraction in [0, 1), got {min_gain}")
    if len(expert_load) != current.num_experts:
        raise ValueError(f"{len(expert_load)} loads for {current.num_experts} experts")
    judged = list(layer_loads) if layer_loads is not None else [expert_load]
    if any(len(load) != current.num_experts for load in judged):
        raise ValueError(f"every layer's load needs {current.num_experts} entries")
    planned = plan_placement(expert_load, current.num_shards, slots_per_shard=slots_per_shard)

    def slowest(placement: Placement) -> float:
        return sum(max(expected_shard_rows(placement, load)) for load in judged) / len(judged)

    before, after = slowest(current), slowest(planned)
    if before <= 0.0 or planned == current or after > before * (1.0 - min_gain):
        return None
    return planned


def _check_load(expert_load: Sequence[float]) -> None:
    if not expert_load:
        raise ValueError("need at least one expert, got an empty load")
    for expert, value in enumerate(expert_load):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expert {expert} has load {value}: loads are finite and >= 0")


__all__ = ["Transfer", "expected_shard_rows", "plan_placement", "rebalance", "shard_rows", "transfers"]
