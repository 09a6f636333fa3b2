"""The routed-expert parts of the trunk's resident LoRA adapters, for the experts one shard holds.

Legend: S the trunk bank's slots, E' the shard's experts, r the bank's max_rank, R rows of a dispatch, H hidden,
I expert intermediate.

Central rule: the trunk bank's layout (herd.model.lora_bank) over the shard's experts only. Per MoE layer and
expert weight, A [(S+1)*E', r, Din], B [(S+1)*E', Dout, r] and scaling; entry (slot + 1) * E' + i holds the
adapter in bank slot `slot` for the shard's i-th expert, and entries 0..E'-1 (the base model) stay zero. A row
sent with row slot j (0: the base model, s + 1: bank slot s) of the shard's i-th expert gathers entry j * E' + i,
so base rows add exactly zero and each row gets its own adapter, as in the trunk's in-process experts.

The trunk's bank tells the shards (herd.workers.dispatch) when it loads an adapter into a slot or empties one,
between engine steps. A shard reads the adapter itself (herd.model.lora.load_adapter, from the same filesystem
as its checkpoint) over gRPC, Ray and the collective group; the in-process transport hands it the loaded adapter.
Stacks are allocated for a layer's expert weight when the first adapter covering it arrives.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from herd.kernels.lora import ExpertsLoRA, LoRAStack
from herd.model.lora import LoRAAdapter, LoRAFactors
from herd.model.lora_sites import EXPERTS, Site


class ShardAdapters:
    """Adapter factors of experts `experts` of the MoE layers `layers`, in `dtype` on `device`."""

    def __init__(self, experts: Sequence[int], layers: Collection[int], *, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.experts, self.layers = tuple(experts), frozenset(layers)
        self.dtype, self.device = dtype, device
        self.slots, self.max_rank = 0, 0
        self.stacks: dict[Site, LoRAStack] = {}

    def load(self, slot: int, adapter: LoRAAdapter, *, slots: int, max_rank: int) -> None:
        """Put `adapter`'s factors for the held experts into `slot` of a bank of `slots` slots and rank `max_rank`
        (replacing what was there); ValueError naming what does not fit. A bank of another size empties all."""
        if slots < 1 or not 0 <= slot < slots or max_rank < 1:
            raise ValueError(f"slot {slot} of {slots} slots, max_rank {max_rank}: not a bank's slot")
        if adapter.rank > max_rank:
            raise ValueError(f"{adapter.path}: rank {adapter.rank} is over the bank's max_rank {max_rank}")
        factors = self.check(adapter)
        if (slots, max_rank) != (self.slots, self.max_rank):
            self.slots, self.max_rank, self.stacks = slots, max_rank, {}
        self.unload(slot)
        held = torch.tensor(self.experts)
        entries = self._entries(slot)
        for site, f in factors.items():
            stack = self.stacks.get(site) or self._allocate(site, f.a.shape[2], f.b.shape[1])
            if stack.a.shape[2] != f.a.shape[2] or stack.b.shape[1] != f.b.shape[1]:
                raise ValueError(f"{adapter.path}: layers.{site[0]}.{site[1]} factors {list(f.a.shape)} / "
                                 f"{list(f.b.shape)} do not fit this model's experts")
            with torch.no_grad():
                stack.a[entries, : adapter.rank] = f.a[held].to(self.device, self.dtype)
                stack.b[entries, :, : adapter.rank] = f.b[held].to(self.device, self.dtype)
                stack.scaling[entries] = adapter.scaling

    def check(self, adapter: LoRAAdapter) -> dict[Site, LoRAFactors]:
        """`adapter`'s routed-expert factors by site; ValueError if they do not fit this shard's layers and experts."""
        factors = {site: f for site, f in adapter.modules.items() if f.a.dim() == 3}  # [E, r, Din], [E, Dout, r]
        for (layer, name), f in factors.items():
            if layer not in self.layers or name not in EXPERTS:
                raise ValueError(f"{adapter.path}: layers.{layer}.{name} is not a routed-expert weight of this shard "
                                 f"(MoE layers {sorted(self.layers)})")
            if f.a.shape[0] <= max(self.experts):
                raise ValueError(f"{adapter.path}: layers.{layer}.{name} has factors for {f.a.shape[0]} experts; this "
                                 f"shard holds experts {list(self.experts)}")
        return factors

    def unload(self, slot: int) -> None:
        """Zero `slot`'s factors: a row still naming it adds nothing."""
        if not 0 <= slot < self.slots:
            return
        entries = self._entries(slot)
        for stack in self.stacks.values():
            stack.a[entries].zero_()
            stack.b[entries].zero_()
            stack.scaling[entries].zero_()

    def lora(self, layer: int, counts: Sequence[int], row_slots: torch.Tensor) -> ExpertsLoRA:
        """The adapters of rows grouped by expert (`counts` [E'] rows each, in the shard's order) with row slots
        row_slots [R] (0: base, s + 1: bank slot s); ValueError for row slots that do not fit."""
        rows = sum(counts)
        if not isinstance(row_slots, torch.Tensor) or row_slots.dtype != torch.int64 or row_slots.dim() != 1:
            raise ValueError("row_slots must be a 1-D int64 tensor (each row's bank slot + 1, 0: the base model)")
        if row_slots.shape[0] != rows:
            raise ValueError(f"row_slots has {row_slots.shape[0]} entries; {rows} rows were sent")
        gate_up, down = (self.stacks.get((layer, name)) for name in EXPERTS)
        if gate_up is None and down is None:
            raise ValueError(f"row_slots sent for layer {layer}, but no adapter loaded on this shard covers its "
                             "routed experts")
        if rows:
            low, high = (int(v) for v in torch.aminmax(row_slots))  # a host sync where row_slots are on a device
            if low < 0 or high > self.slots:
                raise ValueError(f"row_slots hold {low}..{high}; valid: 0 (the base model) and 1..{self.slots} "
                                 "(bank slot + 1)")
        local = torch.repeat_interleave(torch.arange(len(self.experts)), torch.tensor(list(counts), dtype=torch.int64))
        entries = row_slots.to(self.device) * len(self.experts) + local.to(self.device)  # [R]
        return ExpertsLoRA(gate_up=gate_up, down=down, row_index=entries)

    def _entries(self, slot: int) -> slice:
        per_slot = len(self.experts)
        return slice((slot + 1) * per_slot, (slot + 2) * per_slot)

    def _allocate(self, site: Site, d_in: int, d_out: int) -> LoRAStack:
        entries = (self.slots + 1) * len(self.experts)
        stack = LoRAStack(
            a=torch.zeros(entries, self.max_rank, d_in, dtype=self.dtype, device=self.device),
            b=torch.zeros(entries, d_out, self.max_rank, dtype=self.dtype, device=self.device),
            scaling=torch.zeros(entries, dtype=self.dtype, device=self.device),
        )
        self.stacks[site] = stack
        return stack
