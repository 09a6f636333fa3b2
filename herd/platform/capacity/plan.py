"""`herd plan`: what one replica needs on each GPU, whether it fits, and how far it stretches.

A Herd replica is a trunk (attention, shared expert, dense MLPs, router, embeddings, vision, the whole
KV cache and the step's activations) on GPU 0, and expert shards holding the routed experts in
contiguous balanced ranges (herd.workers.placement). On one GPU the shard shares it with the trunk; on
several, the planner tries the shards on GPUs 1..G-1 (the trunk's GPU then keeps all its memory for KV)
and on all G GPUs, and keeps the layout that fits with the longest context.

With `trunks` M > 1 (issue 28, MegaScale-Infer style; the runtime does not serve it yet) GPUs 0..M-1
are trunks, each a full copy of the trunk's weights (data-parallel attention) with its KV share and
activations, and the N = G - M other GPUs are the expert shards, every shard taking the routed rows of
all M trunks' steps. Without context parallelism a sequence lives on one trunk: the sequences are spread
over the trunks (each counted with the most any holds, ceil(S/M)), so the largest context is one trunk's
and the batch about M times one trunk's. With `context_parallel`, every sequence's global-layer KV is
split over the M trunks (herd.platform.capacity.memory: the chunked windows counted on every trunk).

Each GPU may use `memory_utilization` of its memory. The largest context (for the requested number of
sequences) and the largest batch (for the requested context) are found by bisection on the same
accounting. For comparison with published figures of tensor-parallel engines, `tensor_parallel_context`
spreads all weights and a KV cache that keeps every layer's whole context evenly over the G GPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from herd.engine.paged_kv import bytes_per_block
from herd.model.config import TextConfig
from herd.model.vision_config import VisionConfig
from herd.platform.capacity.gpus import GpuType
from herd.platform.capacity.memory import (
    KV_DTYPES,
    SHARD_RESERVE_BYTES,
    TRUNK_RESERVE_BYTES,
    Workload,
    kv_bytes,
    shard_activation_bytes,
    trunk_activation_bytes,
)
from herd.platform.capacity.weights import WeightSizes, weight_sizes
from herd.workers.placement import place_experts


@dataclass(frozen=True, kw_only=True)
class GpuUse:
    """Bytes one GPU of the replica holds."""

    index: int
    role: str
    """trunk, trunk + shard 0, trunk t (of several) or shard s."""
    experts: tuple[int, ...]
    """Routed experts (of every MoE layer) this GPU's shard holds; () for the trunk alone."""
    weights: dict[str, int]
    """Weight bytes by part (routed experts: this GPU's share)."""
    kv_bytes: int
    activation_bytes: int
    reserve_bytes: int
    capacity_bytes: int
    """memory_utilization of the GPU's memory."""

    @property
    def total_bytes(self) -> int:
        return sum(self.weights.values()) + self.kv_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @property
    def over_bytes(self) -> int:
        """Bytes past the capacity (negative: room left)."""
        return self.total_bytes - self.capacity_bytes


@dataclass(frozen=True)
class Plan:
    gpus: tuple[GpuUse, ...]
    weights: WeightSizes
    load: Workload
    max_position_embeddings: int
    largest_context: int
    """Longest context per sequence for load.sequences sequences (0: not even one token; capped at the
    model's max_position_embeddings)."""
    largest_batch: int
    """Most sequences of load.context_tokens at once (0: not one)."""
    largest_context_without_chunk_saving: int
    """The same with every layer keeping the whole context (how far Herd's chunk-aware KV moves it)."""
    tensor_parallel_context: int
    """Longest context of a tensor-parallel engine over the same GPUs, every layer's KV kept (for published
    figures such as vLLM's)."""
    trunks: int = 1
    """M: GPUs holding a copy of the trunk."""
    context_parallel: bool = False
    """Each sequence's global-layer KV split over the M trunks."""

    @property
    def fits(self) -> bool:
        return all(g.fits for g in self.gpus)

    @property
    def shards(self) -> int:
        """N: GPUs holding routed experts (the trunk's GPU included when it holds a shard too)."""
        return sum(1 for g in self.gpus if g.experts)

    @property
    def worst_gpu(self) -> GpuUse:
        """The GPU closest to (or furthest past) its capacity."""
        return max(self.gpus, key=lambda g: g.over_bytes)


def plan(text: TextConfig, vision: VisionConfig | None, *, weight_format: str, gpu: GpuType, num_gpus: int,
         load: Workload, memory_utilization: float = 0.90, trunks: int = 1, context_parallel: bool = False) -> Plan:
    """The best layout of one replica with `trunks` trunks on `num_gpus` GPUs of `gpu`, and its limits."""
    if num_gpus < 1:
        raise ValueError(f"a replica needs at least one GPU, got {num_gpus}")
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {memory_utilization}")
    if trunks < 1 or (trunks > 1 and trunks >= num_gpus):
        raise ValueError(f"trunks must be 1, or fewer than the {num_gpus} GPUs (each shard needs one), got {trunks}")
    weights = weight_sizes(text, vision, weight_format)
    capacity = int(gpu.memory_bytes * memory_utilization)
    experts = text.num_local_experts
    if trunks == 1:
        layouts = [s for s in (num_gpus - 1, num_gpus) if 1 <= s <= experts] or [experts]  # GPUs past E idle
    else:
        layouts = [min(num_gpus - trunks, experts)]
    spread = trunks if context_parallel else 1

    def build(shards: int, use: Workload, chunk_aware: bool = True) -> tuple[GpuUse, ...]:
        return _layout(text, weights, use, (trunks, shards, num_gpus), capacity, chunk_aware, spread)

    def longest(shards: int, chunk_aware: bool) -> int:
        return _bisect(lambda x: all(g.fits for g in build(shards, dataclasses.replace(load, context_tokens=x),
                                                            chunk_aware)), text.max_position_embeddings)

    contexts = {s: longest(s, True) for s in layouts}
    best = max(layouts, key=lambda s: (all(g.fits for g in build(s, load)), contexts[s]))
    return Plan(
        gpus=build(best, load), weights=weights, load=load, max_position_embeddings=text.max_position_embeddings,
        largest_context=contexts[best],
        largest_batch=_bisect(lambda n: all(g.fits for g in build(best, dataclasses.replace(load, sequences=n))),
                              1 << 20),
        largest_context_without_chunk_saving=longest(best, False),
        tensor_parallel_context=_tensor_parallel_context(text, weights, load, num_gpus, capacity),
        trunks=trunks, context_parallel=context_parallel and trunks > 1,
    )


def _layout(text: TextConfig, weights: WeightSizes, load: Workload, counts: tuple[int, int, int], capacity: int,
            chunk_aware: bool, context_parallel: int) -> tuple[GpuUse, ...]:
    """GPUs 0..M-1 the trunks, the last N the shards (GPU 0 holds one too only when M = 1 and N = G);
    counts is (M, N, G), context_parallel the trunks each sequence's global KV is split over (1: none)."""
    trunks, shards, num_gpus = counts
    placement = place_experts(text.num_local_experts, shards)
    first = num_gpus - shards
    trunk_parts = {p: b for p, b in weights.bytes.items() if p != "routed_experts"}
    # a trunk's sequences: all of them, each its share, with context parallelism; else the most one trunk holds
    per_trunk = load if context_parallel > 1 else dataclasses.replace(load, sequences=-(-load.sequences // trunks))
    trunk_kv = kv_bytes(text, per_trunk, chunk_aware=chunk_aware, context_parallel=context_parallel)
    trunk_act = trunk_activation_bytes(text, per_trunk, context_parallel=context_parallel)
    out = []
    for index in range(num_gpus):
        shard, trunk = index - first, index < trunks
        experts = placement.shard_experts[shard] if 0 <= shard < shards else ()
        parts = dict(trunk_parts) if trunk else {}
        parts["routed_experts"] = weights.experts_bytes(len(experts))
        role = ("trunk" if trunks == 1 else f"trunk {index}") if trunk else f"shard {shard}"
        if trunk and experts:
            role = f"{role} + shard {shard}"
        out.append(GpuUse(
            index=index, role=role, experts=experts, weights=parts,
            kv_bytes=trunk_kv if trunk else 0,
            activation_bytes=(trunk_act if trunk else 0)
            + (shard_activation_bytes(text, load, trunks=trunks) if experts else 0),
            reserve_bytes=TRUNK_RESERVE_BYTES if trunk else SHARD_RESERVE_BYTES,
            capacity_bytes=capacity,
        ))
    return tuple(out)


def _tensor_parallel_context(text: TextConfig, weights: WeightSizes, load: Workload, num_gpus: int,
                             capacity: int) -> int:
    """Context per sequence when weights and a full (not chunk-aware) KV cache are split over the GPUs."""
    step = dataclasses.replace(load, context_tokens=1)  # the activations without Herd's per-layer gather
    per_gpu = capacity - TRUNK_RESERVE_BYTES - trunk_activation_bytes(text, step)
    room = num_gpus * per_gpu - weights.total_bytes
    per_token = sum(bytes_per_block(text, 1, KV_DTYPES[load.kv_dtype]).values())  # every layer's K and V
    if room <= 0:
        return 0
    return min(int(room // per_token) // load.sequences, text.max_position_embeddings)


def _bisect(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with fits(n), fits being monotone (0 when not even 1 fits)."""
    if not fits(1):
        return 0
    if fits(high):
        return high
    low = 1  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
