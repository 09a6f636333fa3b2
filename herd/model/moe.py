"""Llama 4 mixture-of-experts layer: router, routed experts, shared expert.

Legend: T tokens, k experts per token, E experts, H hidden, I expert intermediate, R = T*k rows.

The layer routes and permutes its tokens, hands the grouped rows to an experts executor, and combines
what comes back. The executor is an interface this layer owns: in-process by default (the experts
held here), and the workers layer injects a remote one that dispatches rows to expert shards.

Host syncs (issue 20): route's ids are in range and permute's offsets rise from 0 to R by construction, so
the layer skips the kernels' value checks (check_values=False) and, with float experts held here, runs with
no host sync (counts and offsets stay on the device). Syncs that stay: quantised experts (int4, FP8) and the
per-expert fallback loop over experts on the host (herd.kernels.backend, herd.kernels.torch_moe); a process
holding only some experts reads which experts got rows (to raise MissingExpertsError); a remote executor
(herd.workers.dispatch) copies the rows to the host to send them, until a collective transport (issue 21).

Overlap (issue 21): the layer submits its rows to the executor, runs the shared expert while they are out,
then waits for them; the sum is the same as computing them in either order. `begin` splits the layer at that
wait, so a forward of micro-batches (issue 28) runs another micro-batch's attention there too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, cast

import torch
from torch import nn

from herd import kernels
from herd.kernels import QuantizedTensor
from herd.kernels.int4 import GROUP
from herd.kernels.lora import ExpertsLoRA
from herd.model.config import TextConfig
from herd.model.lora_batch import LoRAScope
from herd.model.mlp import FeedForward
from herd.model.quant.layout import expert_storage, expert_weights, keep_storage_dtypes


class ExpertsExecutor(Protocol):
    """Runs routed experts on rows grouped by expert: rows [R, H], expert_offsets [E+1] -> [R, H].

    Groups follow `expert_order` (every expert once; None means by id), which the executor chooses
    so that, for example, each expert shard's rows come out contiguous.
    """

    @property
    def expert_order(self) -> tuple[int, ...] | None: ...

    def __call__(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        """submit(...)(): the outputs [R, H] at once."""
        ...

    def submit(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start the experts on the rows; the returned function waits for and returns the outputs [R, H].

        LoRA on the routed experts: an executor that holds the adapters' expert factors itself (an
        herd.model.lora_bank.ExpertAdapterSink, to which the model's bank hands each adapter it loads) also takes
        `row_slots` [R] int64 as a keyword of both calls: each row's adapter, bank slot + 1 (0: the base model).
        It is given only when a resident adapter covers this layer's routed experts, so rows without adapters go
        to any executor exactly as without LoRA.
        """
        ...


class MissingExpertsError(RuntimeError):
    """Rows were routed to experts this process does not hold and no remote executor was given."""


class Experts(nn.Module):
    """The routed experts of one layer held in this process: all E of them, or a shard's subset.

    Stored fused as in the checkpoint, in ascending expert id: gate_up_proj [E_held, H, 2I],
    down_proj [E_held, I, H]; or, with `scheme` int4 or fp8, kept quantised in the buffers that
    herd.model.quant.layout lays out (and dequantised only inside the kernels).
    """

    def __init__(self, config: TextConfig, expert_ids: Sequence[int], *, scheme: str | None = None,
                 group: int = GROUP) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.expert_ids = tuple(sorted(set(expert_ids)))
        self.scheme, self.group = scheme, group
        self.hidden, self.inter = config.hidden_size, config.intermediate_size
        held = len(self.expert_ids)
        if scheme is None:
            self.gate_up_proj = nn.Parameter(torch.empty(held, self.hidden, 2 * self.inter))
            self.down_proj = nn.Parameter(torch.empty(held, self.inter, self.hidden))
        else:
            for name, (shape, dtype) in expert_storage(scheme, held, self.hidden, self.inter, group).items():
                self.register_buffer(name, torch.empty(shape, dtype=dtype))
        self._holds_all = self.expert_ids == tuple(range(self.num_experts))

    def weights(self) -> tuple[torch.Tensor | QuantizedTensor, torch.Tensor | QuantizedTensor]:
        """(gate_up [E_held, H, 2I], down [E_held, I, H]) as kernels.experts takes them."""
        if self.scheme is None:
            return self.gate_up_proj, self.down_proj
        return expert_weights(self.scheme, dict(self.named_buffers()), self.hidden, self.inter, self.group)

    def forward(self, rows: torch.Tensor, expert_offsets: torch.Tensor, *, check_values: bool = True,
                lora: ExpertsLoRA | None = None) -> torch.Tensor:
        """Rows grouped over all E experts -> outputs, running only the experts held here.

        check_values=False: the offsets are permute's (valid by construction), so they are not read to check
        them (see herd.kernels.experts). Holding only some experts, this reads which got rows: a host sync.
        `lora`: each row's adapter deltas (entries over all E experts, whichever are held).
        """
        gate_up, down = self.weights()
        if self._holds_all:
            return kernels.experts(rows, expert_offsets, gate_up, down, check_values=check_values, lora=lora)
        counts = expert_offsets.diff()  # [E]
        missing = set(counts.nonzero().flatten().tolist()) - set(self.expert_ids)  # a host sync
        if missing:
            raise MissingExpertsError(
                f"rows were routed to experts {sorted(missing)}, but this process holds only {list(self.expert_ids)}"
            )
        # Unheld experts have no rows, so the held experts' rows are contiguous and in id order.
        held = torch.tensor(self.expert_ids, device=counts.device)
        local_offsets = torch.zeros(len(self.expert_ids) + 1, dtype=torch.int64, device=counts.device)
        local_offsets[1:] = torch.cumsum(counts[held], 0)
        return kernels.experts(rows, local_offsets, gate_up, down, check_values=check_values, lora=lora)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        if self.scheme is None:
            module: nn.Module = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # bare in torch
            return module
        return keep_storage_dtypes(self, fn)


class MoE(nn.Module):
    """Router -> top-k experts scaled on their input -> plus the shared expert on every token."""

    def __init__(self, config: TextConfig, layer: int, expert_ids: Sequence[int]) -> None:
        super().__init__()
        self.layer = layer
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config, expert_ids)
        self.shared_expert = FeedForward(config.hidden_size, config.intermediate_size)
        self.executor: ExpertsExecutor | None = None

    def forward(self, x: torch.Tensor, lora: LoRAScope | None = None) -> torch.Tensor:
        """[T, H] -> [T, H]; `lora`: each token's adapter deltas (shared expert, and routed experts in-process)."""
        return self.begin(x, lora)()

    def begin(self, x: torch.Tensor, lora: LoRAScope | None = None) -> Callable[[], torch.Tensor]:
        """Route, send the routed rows to the executor and run the shared expert meanwhile; the function returned
        waits for the rows and combines: [T, H]. What the caller runs between the two (another micro-batch's
        attention, herd.model.llama4's ping-pong) overlaps the rows' time at the shards as well."""
        topk_ids, topk_scores = kernels.route(self.router(x), self.top_k)  # [T, k] each
        order = getattr(self.executor, "expert_order", None)  # a plain function groups by expert id
        rows, permutation = kernels.permute(x, topk_ids, topk_scores, self.num_experts, expert_order=order,
                                            check_values=False)  # route's ids are in range
        if lora is not None:
            shared, pending = self._begin_lora(x, rows, permutation, topk_ids, lora)
        elif self.executor is None:
            out_rows = self.experts(rows, permutation.expert_offsets, check_values=False)  # permute's offsets
            shared, pending = self.shared_expert(x), lambda: out_rows  # [T, H]
        else:
            pending = _submit(self.executor, self.layer, rows, permutation.expert_offsets)
            shared = self.shared_expert(x)  # while the routed rows are at the shards
        return lambda: shared + kernels.combine(pending(), permutation, x.shape[0])

    def idle(self, like: torch.Tensor) -> Callable[[], torch.Tensor]:
        """An empty micro-batch's turn at this layer: the executor is sent no rows (with several trunks, the empty
        header the shards wait for); nothing with experts held here. `like` [0, H] gives dtype and device."""
        if self.executor is None:
            return lambda: like
        offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=like.device)
        pending = _submit(self.executor, self.layer, like, offsets)

        def finish() -> torch.Tensor:
            pending()  # no rows back, but the step is the shards' and is waited for
            return like

        return finish

    def _begin_lora(self, x: torch.Tensor, rows: torch.Tensor, permutation: kernels.Permutation,
                    topk_ids: torch.Tensor, lora: LoRAScope) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """The shared expert's output [T, H] and the routed rows' wait, with each token's adapter deltas."""
        row_source = permutation.row_source.long()  # [R]: flat token * k + choice
        row_tokens = torch.div(row_source, self.top_k, rounding_mode="floor")  # [R]
        row_experts = topk_ids.reshape(-1).index_select(0, row_source).long()  # [R]
        experts_lora = lora.experts(row_tokens, row_experts, self.num_experts)
        if self.executor is None:
            out_rows = self.experts(rows, permutation.expert_offsets, check_values=False, lora=experts_lora)
            return self.shared_expert(x, lora.sub("shared_expert.")), lambda: out_rows  # [T, H]
        if experts_lora is not None and getattr(self.executor, "holds_experts_here", False):
            # An executor over this process's own experts (it counts their rows): the factors are the bank's here.
            local = cast(Callable[..., torch.Tensor], self.executor)  # CountingExperts (herd.workers.expert_load)
            out_rows = local(self.layer, rows, permutation.expert_offsets, lora=experts_lora)
            return self.shared_expert(x, lora.sub("shared_expert.")), lambda: out_rows
        if experts_lora is not None:  # the bank holds expert factors here: the executor is no expert sink
            raise ValueError(
                f"layer {self.layer}: an adapter covers the routed experts, which run through "
                f"{type(self.executor).__name__}, an executor that cannot hold adapters: routed-expert LoRA needs "
                "the experts held in this process or at expert shards (herd.workers.dispatch)")
        row_slots = lora.expert_slots(row_tokens)  # [R] or None
        pending = _submit(self.executor, self.layer, rows, permutation.expert_offsets, row_slots)
        return self.shared_expert(x, lora.sub("shared_expert.")), pending  # shared while the rows are out


def _submit(executor: ExpertsExecutor, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor,
            row_slots: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    """executor.submit; an executor without one (a plain function) runs at once, with nothing to overlap. Rows
    without adapters go exactly as before LoRA (no row_slots argument), so any executor takes them."""
    submit = getattr(executor, "submit", None)
    if submit is not None:
        pending: Callable[[], torch.Tensor] = (submit(layer, rows, expert_offsets) if row_slots is None
                                               else submit(layer, rows, expert_offsets, row_slots=row_slots))
        return pending
    run: Callable[..., torch.Tensor] = executor
    out = run(layer, rows, expert_offsets) if row_slots is None else run(layer, rows, expert_offsets,
                                                                         row_slots=row_slots)
    return lambda: out
