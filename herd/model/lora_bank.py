"""The resident LoRA adapters of one model, stacked so that one forward serves rows of many adapters at once.

Legend: S slots, r = max_rank, E routed experts, Din / Dout a weight's inputs / outputs.

Central rule: stack entry 0 is the base model and stays zero; slot s (0..S-1) is entry s + 1. A token whose
slot is -1 gathers entry 0 and so adds exactly zero: base rows in a mixed batch equal the model without LoRA.
Per adapted site, A [S+1, r, Din], B [S+1, Dout, r] and scaling [S+1]; a routed-expert site holds one entry
per (slot, expert), entry * E + expert. An adapter of rank below r fills the first ranks and leaves the rest
zero. A site's stack is allocated when the first adapter covering it is loaded, so a bank of attention-only
adapters costs no expert memory.

Loading is registration: an adapter that cannot run on this model (rank over max_rank, routed-expert factors
on quantised experts, a shape from another model) raises AdapterError here, never in a forward.

Experts elsewhere: when the routed experts run through an executor that holds adapters itself (the workers'
expert shards), the model gives the bank that executor as its `expert_sink`. The bank then allocates no expert
stacks (they would sit unused in the trunk's memory): it hands each loaded adapter to the sink, which puts the
routed-expert factors next to the experts, and tells it when a slot empties. `remote_expert_layers` are the MoE
layers whose routed experts some resident adapter covers there; only their forwards send each row's slot along.
"""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import torch

from herd.kernels.lora import LoRAStack
from herd.model.config import TextConfig
from herd.model.lora import LoRAAdapter, LoRAFactors
from herd.model.lora_config import MAX_RANK, AdapterError
from herd.model.lora_sites import Site, SiteShape, layer_sites

BASE_SLOT = -1


@runtime_checkable
class ExpertAdapterSink(Protocol):
    """Holds the routed-expert parts of a bank's adapters where the experts run (herd.workers.dispatch)."""

    def load_expert_adapter(self, slot: int, adapter: LoRAAdapter, *, slots: int, max_rank: int) -> None:
        """Put `adapter`'s routed-expert factors into `slot` of a bank of `slots` slots and rank `max_rank`
        (replacing what was there); raises if it cannot."""
        ...

    def unload_expert_adapter(self, slot: int) -> None:
        """Zero `slot`'s routed-expert factors."""
        ...

    def check_expert_adapter(self, adapter: LoRAAdapter) -> None:
        """AdapterError if the experts' holders could not load `adapter` (read it where they are, fit it)."""
        ...


class AdapterBank:
    """Up to `slots` adapters held at once, in the model's dtype and on its device."""

    def __init__(self, config: TextConfig, *, slots: int, max_rank: int = MAX_RANK, dtype: torch.dtype,
                 device: torch.device | str, quantized_experts: bool = False,
                 expert_sink: ExpertAdapterSink | None = None) -> None:
        if slots < 1:
            raise ValueError(f"an adapter bank needs at least one slot, got {slots}")
        if not 1 <= max_rank <= MAX_RANK:
            raise ValueError(f"max_rank must be in 1..{MAX_RANK}, got {max_rank}")
        self.config, self.slots, self.max_rank = config, slots, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.quantized_experts = quantized_experts
        self.stacks: dict[Site, LoRAStack] = {}
        self._shapes = {(layer, name): shape for layer in range(config.num_hidden_layers)
                        for name, shape in layer_sites(config, layer).items()}
        self._held: dict[int, LoRAAdapter] = {}
        self.expert_sink = expert_sink
        self.remote_expert_layers: frozenset[int] = frozenset()
        """MoE layers whose routed experts a resident adapter covers at the expert sink."""

    def set_expert_sink(self, sink: ExpertAdapterSink | None) -> None:
        """Hold routed-expert factors at `sink` from now on (None: in this bank). ValueError while a resident
        adapter covers routed experts (they would be split between the two places)."""
        if sink is self.expert_sink:
            return
        if any(_expert_layers(adapter) for adapter in self._held.values()):
            raise ValueError("cannot move routed-expert adapters between the trunk and an expert executor while "
                             "some are resident: change the experts executor before loading adapters")
        self.expert_sink = sink
        self.stacks = {site: stack for site, stack in self.stacks.items() if not self._shapes[site].experts}

    def adapter(self, slot: int) -> LoRAAdapter | None:
        """The adapter in `slot`, if any."""
        return self._held.get(slot)

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Put `adapter` into `slot` (replacing what was there); AdapterError if it cannot run on this model."""
        self._check_slot(slot)
        self._check_here(adapter)  # check_fits without asking the sink: its load checks there
        self.unload(slot)
        sink = self.expert_sink
        for site, factors in adapter.modules.items():
            if sink is not None and self._shapes[site].experts:
                continue  # the sink holds it
            stack = self.stacks.get(site) or self._allocate(site)
            self._write(stack, self._shapes[site], slot, factors, adapter.scaling)
        if sink is not None and _expert_layers(adapter):
            try:
                sink.load_expert_adapter(slot, adapter, slots=self.slots, max_rank=self.max_rank)
            except BaseException:
                self._zero(slot)
                with contextlib.suppress(Exception):  # a sink that failed to load may fail to unload too
                    sink.unload_expert_adapter(slot)
                raise
        self._held[slot] = adapter
        self._update_remote_layers()

    def unload(self, slot: int) -> None:
        """Empty `slot`: its entries go back to zero, so a token still pointing at it adds nothing."""
        self._check_slot(slot)
        adapter = self._held.pop(slot, None)
        if adapter is None:
            return
        self._zero(slot)
        if self.expert_sink is not None and _expert_layers(adapter):
            self._update_remote_layers()
            self.expert_sink.unload_expert_adapter(slot)

    def _zero(self, slot: int) -> None:
        for site, stack in self.stacks.items():
            entries = _entries(self._shapes[site], slot)
            stack.a[entries].zero_()
            stack.b[entries].zero_()
            stack.scaling[entries].zero_()

    def _update_remote_layers(self) -> None:
        covered: set[int] = set()
        if self.expert_sink is not None:
            for adapter in self._held.values():
                covered |= _expert_layers(adapter)
        self.remote_expert_layers = frozenset(covered)

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise ValueError(f"slot must be in 0..{self.slots - 1}, got {slot!r}")

    def check_fits(self, adapter: LoRAAdapter) -> None:
        """AdapterError if `adapter` cannot be held by this bank (rank, shapes, experts held quantised), or, with
        an expert sink, by the experts' holders (the expert shards read it where they are)."""
        self._check_here(adapter)
        if self.expert_sink is not None and _expert_layers(adapter):
            self.expert_sink.check_expert_adapter(adapter)

    def _check_here(self, adapter: LoRAAdapter) -> None:
        if adapter.rank > self.max_rank:
            raise AdapterError(f"{adapter.path}: rank {adapter.rank} is over this bank's max_rank {self.max_rank}")
        for (layer, name), factors in adapter.modules.items():
            shape = self._shapes.get((layer, name))
            if shape is None or _shape_of(factors) != shape:
                raise AdapterError(f"{adapter.path}: layers.{layer}.{name} does not fit this model "
                                   f"(factors {list(factors.a.shape)} / {list(factors.b.shape)})")
            if shape.experts and self.quantized_experts:
                raise AdapterError(f"{adapter.path}: layers.{layer}.{name} adapts routed experts, which this model "
                                   "holds quantised; LoRA on routed experts needs float expert weights")

    def _allocate(self, site: Site) -> LoRAStack:
        shape = self._shapes[site]
        entries = (self.slots + 1) * max(shape.experts, 1)
        stack = LoRAStack(
            a=torch.zeros(entries, self.max_rank, shape.d_in, dtype=self.dtype, device=self.device),
            b=torch.zeros(entries, shape.d_out, self.max_rank, dtype=self.dtype, device=self.device),
            scaling=torch.zeros(entries, dtype=self.dtype, device=self.device),
        )
        self.stacks[site] = stack
        return stack

    def _write(self, stack: LoRAStack, shape: SiteShape, slot: int, factors: LoRAFactors, scaling: float) -> None:
        entries, rank = _entries(shape, slot), factors.a.shape[-2]
        a = factors.a.reshape(-1, rank, shape.d_in)  # [1 or E, r, Din]
        b = factors.b.reshape(-1, shape.d_out, rank)  # [1 or E, Dout, r]
        with torch.no_grad():
            stack.a[entries, :rank] = a.to(self.device, self.dtype)
            stack.b[entries, :, :rank] = b.to(self.device, self.dtype)
            stack.scaling[entries] = scaling


def _entries(shape: SiteShape, slot: int) -> slice:
    """The stack entries of `slot`: one, or E for a routed-expert site."""
    per_slot = max(shape.experts, 1)
    return slice((slot + 1) * per_slot, (slot + 2) * per_slot)


def _expert_layers(adapter: LoRAAdapter) -> set[int]:
    """The layers whose routed experts `adapter` covers."""
    return {layer for (layer, _), factors in adapter.modules.items() if factors.a.dim() == 3}


def _shape_of(factors: LoRAFactors) -> SiteShape:
    if factors.a.dim() == 3:
        return SiteShape(factors.a.shape[2], factors.b.shape[1], factors.a.shape[0])
    return SiteShape(factors.a.shape[1], factors.b.shape[0])
