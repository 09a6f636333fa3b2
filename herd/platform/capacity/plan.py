"""`herd plan`: what one replica needs on each GPU, whether it fits, and how far it stretches.

A Herd replica is a trunk (attention, shared expert, dense MLPs, router, embeddings, vision, the whole
KV cache and the step's activations) on GPU 0, and expert shards holding the routed experts in
contiguous balanced ranges (herd.workers.placement). On one GPU the shard shares it with the trunk; on
several, the planner tries the shards on GPUs 1..G-1 (the trunk's GPU then keeps all its memory for KV)
and on all G GPUs, and keeps the layout that fits with the longest context.

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
    """trunk, trunk + shard 0, or shard s."""
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

    @property
    def fits(self) -> bool:
        return all(g.fits for g in self.gpus)


def plan(text: TextConfig, vision: VisionConfig | None, *, weight_format: str, gpu: GpuType, num_gpus: int,
         load: Workload, memory_utilization: float = 0.90) -> Plan:
    """The best layout of one replica on `num_gpus` GPUs of `gpu`, and its limits."""
    if num_gpus < 1:
        raise ValueError(f"a replica needs at least one GPU, got {num_gpus}")
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {memory_utilization}")
    weights = weight_sizes(text, vision, weight_format)
    capacity = int(gpu.memory_bytes * memory_utilization)
    experts = text.num_local_experts
    layouts = [s for s in (num_gpus - 1, num_gpus) if 1 <= s <= experts] or [experts]  # GPUs past E idle

    def build(shards: int, use: Workload, chunk_aware: bool = True) -> tuple[GpuUse, ...]:
        return _layout(text, weights, use, shards, num_gpus, capacity, chunk_aware)

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
    )


def _layout(text: TextConfig, weights: WeightSizes, load: Workload, shards: int, num_gpus: int, capacity: int,
            chunk_aware: bool) -> tuple[GpuUse, ...]:
    placement = place_experts(text.num_local_experts, shards)
    first = num_gpus - shards  # shards on the last `shards` GPUs; GPU 0 holds one only when shards == num_gpus
    trunk_parts = {p: b for p, b in weights.bytes.items() if p != "routed_experts"}
    out = []
    for index in range(num_gpus):
        shard = index - first
        experts = placement.shard_experts[shard] if shard >= 0 else ()
        parts = dict(trunk_parts) if index == 0 else {}
        parts["routed_experts"] = weights.experts_bytes(len(experts))
        role = "trunk" if index == 0 else f"shard {shard}"
        if index == 0 and experts:
            role = f"trunk + shard {shard}"
        out.append(GpuUse(
            index=index, role=role, experts=experts, weights=parts,
            kv_bytes=kv_bytes(text, load, chunk_aware=chunk_aware) if index == 0 else 0,
            activation_bytes=(trunk_activation_bytes(text, load) if index == 0 else 0)
            + (shard_activation_bytes(text, load) if experts else 0),
            reserve_bytes=TRUNK_RESERVE_BYTES if index == 0 else SHARD_RESERVE_BYTES,
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
