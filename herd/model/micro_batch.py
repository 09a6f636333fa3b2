"""A forward split into micro-batches that ping-pong between the trunk and the expert shards (issue 28).

Legend: T tokens of a micro-batch, H hidden, V vocab, L logit rows.

MegaScale-Infer's schedule on one trunk: while one micro-batch's routed rows are at the expert shards, the trunk
runs the other's attention, so neither side waits for the other when the two take about as long. Layer by layer,
each micro-batch finishes its previous layer (waits for its rows, combines) and begins the next (attention, the
router, its rows sent, the shared expert):

    begin A0, begin B0, finish A0, begin A1, finish B0, begin B1, finish A1, ...

A micro-batch is a whole set of sequences with its own view of the KV cache, so the arithmetic of every token is
what one forward of them all does: the same tokens come out, and the logits differ at most by the rounding of
GEMMs over fewer rows. With experts held in the trunk there is nothing to overlap and it only costs smaller GEMMs.

An empty micro-batch (no tokens) runs no attention, unless it carries a KV context (with context parallelism its
global layers still take part in the trunks' exchange, herd.engine.context_parallel). At each MoE layer it sends
the executor no rows, which with several trunks of one replica (herd.workers.collective_transport, trunks > 1) is
the header every shard waits for: a trunk with less work than its peers pads its step with empty micro-batches and
stays in lockstep with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.model.kv_cache import KVContext


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch's inputs, as forward takes them for a whole step."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    cache: KVContext | None = None
    logit_rows: torch.Tensor | None = None  # [L]: the rows whose logits are returned (None: every row)
    adapter_slots: torch.Tensor | None = None  # [T]: each token's LoRA bank slot, -1 the base model
    image_embeds: torch.Tensor | None = None  # [M, H]: projected image features ...
    image_rows: torch.Tensor | None = None  # [M]: ... for these rows, in order

    @property
    def empty(self) -> bool:
        return self.input_ids.shape[0] == 0

    @classmethod
    def nothing(cls) -> MicroBatch:
        """A micro-batch of no tokens (its step's rows at the shards: none)."""
        return cls(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
