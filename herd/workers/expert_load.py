"""Tokens routed to each expert of each MoE layer: the load-imbalance signal an operator watches.

Legend: L MoE layers, E experts. Counts are summed since the replica started and read at scrape time
(herd_expert_tokens_total); adding a step's counts is one vector add per layer, cheap enough for every
step. `CountingExperts` is the experts executor of a replica that keeps its experts in the trunk, so
the signal exists with or without expert shards; its counts stay on the experts' device (no copy to
the host, so no GPU sync in the step) until a scrape reads them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from herd.kernels.lora import ExpertsLoRA
from herd.model.llama4 import Llama4Model
from herd.model.moe import MoE


class ExpertLoad:
    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._tokens: dict[int, np.ndarray] = {}  # layer -> [E] rows routed, by expert id
        self._on_device: dict[int, torch.Tensor] = {}  # layer -> [E] int64 where the experts run
        self._lock = threading.Lock()

    def add(self, layer: int, expert_order: Sequence[int], bounds: Sequence[int]) -> None:
        """One layer step: group g (expert expert_order[g]) got rows bounds[g]..bounds[g+1]."""
        counts = np.diff(np.asarray(bounds, dtype=np.int64))
        with self._lock:
            totals = self._tokens.setdefault(layer, np.zeros(self.num_experts, dtype=np.int64))
            totals[np.asarray(expert_order, dtype=np.int64)] += counts

    def add_offsets(self, layer: int, expert_offsets: torch.Tensor) -> None:
        """One layer step of all experts in order: expert e got rows expert_offsets[e]..[e+1], [E+1]."""
        counts = torch.diff(expert_offsets).to(torch.int64)  # [E], on the offsets' device
        with self._lock:
            totals = self._on_device.get(layer)
            if totals is None:
                self._on_device[layer] = counts
            else:
                totals += counts

    def snapshot(self) -> dict[int, list[int]]:
        """{layer: [tokens of expert 0, 1, ...]} so far."""
        with self._lock:
            host = {layer: totals.copy() for layer, totals in self._tokens.items()}
            device = {layer: totals.cpu().numpy() for layer, totals in self._on_device.items()}
        for layer, totals in device.items():
            host[layer] = host[layer] + totals if layer in host else totals
        return {layer: totals.tolist() for layer, totals in sorted(host.items())}


class CountingExperts:
    """An ExpertsExecutor over the experts the model holds in this process, counting each layer's rows."""

    expert_order: tuple[int, ...] | None = None
    """Rows come grouped by expert id, as the experts held here take them."""
    holds_experts_here = True
    """The model's own experts: a LoRA adapter's routed-expert factors stay in the model's bank and come with the
    rows (herd.model.moe)."""

    def __init__(self, model: Llama4Model, load: ExpertLoad, observe_s: Callable[[float], None] | None = None) -> None:
        self.layers = {m.layer: m.experts for m in model.modules() if isinstance(m, MoE)}
        self.load = load
        self.observe_s = observe_s

    def __call__(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor, *,
                 lora: ExpertsLoRA | None = None) -> torch.Tensor:
        start = time.perf_counter()
        self.load.add_offsets(layer, expert_offsets)
        out: torch.Tensor = self.layers[layer](rows, expert_offsets, lora=lora)  # [R, H]
        if self.observe_s is not None:
            self.observe_s(time.perf_counter() - start)
        return out

    def submit(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Computes at once (the experts are here); the function hands the outputs over."""
        out = self(layer, rows, expert_offsets)
        return lambda: out


__all__ = ["CountingExperts", "ExpertLoad"]
