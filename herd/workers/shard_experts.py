"""The experts one shard owns, for every MoE layer, and the one entry that computes them.

Legend: R rows, H hidden, E' the shard's experts. Every transport ends here: the gRPC service (after
decoding the wire), the Ray actor, and the in-process transport. So every dispatch is checked the same way
before any work (a bad one raises ValueError saying what is wrong), and a traced step's compute is a span
of the caller's trace, whichever way the rows came.

LoRA: the shard holds the routed-expert factors of the trunk's resident adapters for its own experts
(herd.workers.shard_adapters), loaded and emptied by slot as the trunk's bank changes; a dispatch of rows that
use adapters carries each row's slot (row_slots), and the compute adds each row's own adapter delta.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import IntEnum
from pathlib import Path

import torch
from opentelemetry import propagate, trace

from herd import kernels
from herd.model.config import TextConfig, load_config
from herd.model.loader import ExpertWeights, load_experts
from herd.model.lora import LoRAAdapter, load_adapter
from herd.model.lora_config import AdapterError
from herd.workers.shard_adapters import ShardAdapters

tracer = trace.get_tracer("herd.workers.expert_shard")


class AdapterAction(IntEnum):
    """What the trunk asks a shard to do with an adapter, by its path (the wire's codes)."""

    LOAD = 1
    UNLOAD = 2
    CHECK = 3


def expert_offsets(counts: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows per expert [E'] -> where each expert's rows start, and the end: [E'+1] int64."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(list(counts), dtype=torch.int64).cumsum(0)
    return offsets.to(device)


class ShardExperts:
    """Experts `experts` of every MoE layer (`layers`: layer -> weights), computed in `dtype`."""

    def __init__(self, layers: Mapping[int, ExpertWeights], *, hidden_size: int, dtype: torch.dtype,
                 config: TextConfig | None = None) -> None:
        """`config`: the model's, to read LoRA adapters from their paths (set_adapter)."""
        if not layers:
            raise ValueError("a shard needs the experts of at least one MoE layer")
        self.layers = dict(layers)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.config = config
        self.experts: tuple[int, ...] = tuple(sorted(next(iter(self.layers.values())).expert_ids))
        self.adapters = ShardAdapters(self.experts, self.layers, dtype=dtype, device=self.device)

    @classmethod
    def load(cls, model: str | Path, experts: Sequence[int], *, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> ShardExperts:
        """Only these experts of a checkpoint (memory in proportion to the shard's share)."""
        config = load_config(model).text
        return cls(load_experts(model, experts, dtype=dtype, device=device), hidden_size=config.hidden_size,
                   dtype=dtype, config=config)

    @property
    def device(self) -> torch.device:
        """Where the weights are (and the rows must be)."""
        return next(iter(self.layers.values())).gate_up.device

    @property
    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self.layers.values())

    def check_adapter(self, adapter: LoRAAdapter) -> None:
        """ValueError unless this shard can hold `adapter`'s factors for its experts."""
        if any(isinstance(w, kernels.QuantizedTensor) for e in self.layers.values() for w in (e.gate_up, e.down)):
            raise ValueError("LoRA on routed experts needs float expert weights; this shard holds them quantised")
        self.adapters.check(adapter)

    def load_adapter(self, slot: int, adapter: LoRAAdapter, *, slots: int, max_rank: int) -> None:
        """Hold `adapter`'s factors for this shard's experts in bank slot `slot` (ValueError if they do not fit)."""
        self.check_adapter(adapter)
        self.adapters.load(slot, adapter, slots=slots, max_rank=max_rank)

    def read_adapter(self, path: str | Path) -> LoRAAdapter:
        """The PEFT adapter at `path`, read here; ValueError naming what failed."""
        if self.config is None:
            raise ValueError("this shard was built without its model's config; it cannot read adapters from a path")
        try:
            return load_adapter(path, self.config)
        except (AdapterError, OSError) as err:
            raise ValueError(f"expert shard of experts {list(self.experts)} cannot read adapter {path}: {err}") from err

    def set_adapter(self, action: AdapterAction, slot: int, path: str, *, slots: int, max_rank: int) -> None:
        """What a remote transport asks for by path: check the adapter at `path`, load it into `slot`, or empty
        `slot` (path unused); ValueError naming what failed."""
        if action is AdapterAction.UNLOAD:
            self.unload_adapter(slot)
        elif action is AdapterAction.CHECK:
            self.check_adapter(self.read_adapter(path))
        else:
            self.load_adapter(slot, self.read_adapter(path), slots=slots, max_rank=max_rank)

    def unload_adapter(self, slot: int) -> None:
        """Empty bank slot `slot` here."""
        self.adapters.unload(slot)

    def check(self, layer: int, counts: Sequence[int], shape: Sequence[int]) -> ExpertWeights:
        """The layer's weights, or ValueError saying what is wrong with a dispatch of rows of `shape`. Shapes
        are checked before any tensor is built from the wire."""
        weights = self.layers.get(layer)
        if weights is None:
            raise ValueError(f"layer {layer} is not a MoE layer of this model ({sorted(self.layers)})")
        if len(counts) != len(self.experts):
            raise ValueError(
                f"counts has {len(counts)} entries; this shard owns {len(self.experts)} experts {list(self.experts)}"
            )
        if any(c < 0 for c in counts):
            raise ValueError(f"counts must not be negative, got {list(counts)}")
        if len(shape) != 2 or shape[1] != self.hidden_size:
            raise ValueError(f"rows must be [R, {self.hidden_size}], got {list(shape)}")
        if sum(counts) != shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but {shape[0]} rows were sent")
        return weights

    def compute(self, layer: int, counts: Sequence[int], rows: torch.Tensor,
                trace_context: Mapping[str, str] | None = None, row_slots: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """SwiGLU of each owned expert over its rows: rows [R, H], grouped by expert in the shard's order with
        `counts` [E'] rows each -> [R, H]. With a trace context (a traced step) the compute is a span of it.
        `row_slots` [R] int64: each row's adapter (bank slot + 1; 0: the base model), whose delta is added."""
        weights = self.check(layer, counts, tuple(rows.shape))
        if rows.dtype != self.dtype:
            raise ValueError(f"rows are {rows.dtype}; this shard computes in {self.dtype}")
        lora = None if row_slots is None else self.adapters.lora(layer, counts, row_slots)
        offsets = expert_offsets(counts, rows.device)
        if not trace_context:
            return kernels.experts(rows, offsets, weights.gate_up, weights.down, lora=lora)
        parent = propagate.extract(dict(trace_context))
        with tracer.start_as_current_span("herd.expert_shard.compute", context=parent, attributes={
                "herd.layer": layer, "herd.rows": rows.shape[0], "herd.experts": len(self.experts)}):
            return kernels.experts(rows, offsets, weights.gate_up, weights.down, lora=lora)
