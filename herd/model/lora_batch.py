"""One forward's adapters: which slot each token uses, and the deltas the layers add with it.

Legend: T tokens, k experts per token, R = T*k expert rows, E experts.

The model builds a LoRABatch from the token slots it is given (herd.model.lora_bank: -1 is the base model) and
hands each layer a scope (its layer index and module prefix). A module adds `scope.add(name, x, y)` after its
own projection; a site no resident adapter covers costs a dictionary lookup. Linears use the masked delta
(herd.kernels.lora.lora_delta_masked): no host sync, and on the CPU from 8 tokens on much faster than gathering
each token's factors (bench/lora_delta.py; the numbers are in herd.kernels.lora).

Routed experts: a row's entry is (its token's slot + 1) * E + its expert, computed after permutation and handed
to the in-process experts (herd.kernels.experts), which gather each row's factors. With the experts at shards
(the bank's expert sink, herd.model.lora_bank), each row's slot + 1 goes with the row instead (`expert_slots`),
and each shard adds its own experts' factors (herd.workers.shard_adapters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.kernels.lora import ExpertsLoRA, lora_delta_masked
from herd.model.lora_bank import AdapterBank
from herd.model.lora_sites import EXPERTS


@dataclass(frozen=True)
class LoRABatch:
    """The bank and each token's stack entry for one forward."""

    bank: AdapterBank
    token_entries: torch.Tensor  # [T] int64: slot + 1 (0: the base model)

    @classmethod
    def of(cls, bank: AdapterBank, slots: torch.Tensor) -> LoRABatch:
        """From token slots [T] (-1: base; 0..S-1: that slot's adapter), checked by the caller."""
        entries = slots.to(bank.device, torch.int64, non_blocking=True) + 1
        return cls(bank=bank, token_entries=entries)

    def scope(self, layer: int, prefix: str) -> LoRAScope:
        return LoRAScope(self, layer, prefix)


@dataclass(frozen=True)
class LoRAScope:
    """A module's view of the batch: its layer and its name prefix (e.g. `feed_forward.shared_expert.`)."""

    batch: LoRABatch
    layer: int
    prefix: str

    def add(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, Dout] of the module `name` for x [T, Din], plus each token's adapter delta."""
        stack = self.batch.bank.stacks.get((self.layer, self.prefix + name))
        if stack is None:
            return y
        return y + lora_delta_masked(x, stack, self.batch.token_entries)

    def sub(self, prefix: str) -> LoRAScope:
        return LoRAScope(self.batch, self.layer, self.prefix + prefix)

    def experts(self, row_tokens: torch.Tensor, row_experts: torch.Tensor, num_experts: int) -> ExpertsLoRA | None:
        """The routed experts' adapters for rows of tokens row_tokens [R] sent to row_experts [R]; None if no
        resident adapter covers this layer's experts."""
        stacks = self.batch.bank.stacks
        gate_up, down = (stacks.get((self.layer, name)) for name in EXPERTS)
        if gate_up is None and down is None:
            return None
        entries = self.batch.token_entries.index_select(0, row_tokens) * num_experts + row_experts  # [R]
        return ExpertsLoRA(gate_up=gate_up, down=down, row_index=entries)

    def expert_slots(self, row_tokens: torch.Tensor) -> torch.Tensor | None:
        """Each row's slot + 1 (0: the base model) for rows of tokens row_tokens [R], when a resident adapter covers
        this layer's routed experts at the bank's expert sink; None otherwise (the rows go as without LoRA)."""
        if self.layer not in self.batch.bank.remote_expert_layers:
            return None
        return self.batch.token_entries.index_select(0, row_tokens)  # [R]
