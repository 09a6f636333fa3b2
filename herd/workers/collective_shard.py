"""An expert shard's side of its replica's collective group: say what it holds, then serve the trunk's messages.

Legend: R_s the shard's rows of a step, H hidden, B bytes of one expert's weights (all of its tensors).

`serve` is a loop on one thread (a shard process's main thread, or a thread of its Ray actor) that waits for the
trunk's next header (herd.workers.collective_protocol) with no deadline worth the name (an idle replica sends
nothing) and answers it: a layer step's rows through ShardExperts.compute (the one compute entry of every
transport), an adapter by reading it from its path (or emptying its slot), a re-placement by swapping weights with
the other shards (the new ShardExperts holds no adapters: the trunk sends them again), a stop by returning. A
failed collective ends the loop with the error (the trunk is gone or the group broke: the replica restarts it
all); a dispatch the shard cannot compute ends it too, after logging why (the trunk then fails its step when its
wait times out, and reports unhealthy).
"""

from __future__ import annotations

import logging
import threading

import torch
from torch._C._distributed_c10d import Work

from herd.kernels import QuantizedTensor
from herd.model.loader import ExpertWeights
from herd.workers.balance import transfers
from herd.workers.collective import IDLE_TIMEOUT_S, CollectiveGroup
from herd.workers.collective_protocol import (
    Op,
    ShardInfo,
    Tag,
    header_part,
    info_size,
    inline_rows,
    message_bytes,
    read_adapter_payload,
    read_header,
    rows_part,
)
from herd.workers.placement import Placement
from herd.workers.shard_experts import AdapterAction, ShardExperts

log = logging.getLogger(__name__)


class CollectiveShard:
    """Rank `group.rank` of a replica: shard `group.rank - 1` of the placement, holding `shard`'s experts."""

    def __init__(self, shard: ShardExperts, group: CollectiveGroup, num_experts: int) -> None:
        if group.rank == 0:
            raise ValueError("rank 0 of a replica's group is its trunk, not a shard")
        self.shard, self.group, self.num_experts = shard, group, num_experts
        self.device = group.device
        self._lock = threading.Lock()  # shard swaps versus readers on other threads
        # The trunk's header messages land in these two in turn: the receive of the next is posted before the answer
        # to this one is sent, so it is waiting when the trunk sends (at once, not after a gloo round trip), while
        # this one's inline rows are still in use.
        size = message_bytes(num_experts, shard.hidden_size, shard.dtype)
        self._messages = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._current = 0  # the buffer of the header message being answered
        self._next: tuple[Work, int] | None = None  # the posted receive of the next one, and its buffer

    @property
    def experts(self) -> tuple[int, ...]:
        with self._lock:
            return self.shard.experts

    def serve(self) -> None:
        """Answer the trunk until it says stop (returns) or the group fails (raises, after logging why)."""
        try:
            self._post_next_header()
            self._introduce()
            while True:
                op, argument, values = self._header()
                if op is Op.STOP:
                    return
                if op in (Op.STEP, Op.LORA_STEP):
                    self._step(argument, values, lora=op is Op.LORA_STEP)
                elif op is Op.ADAPTER:
                    self._adapter(argument)
                else:
                    self._place(argument)
        except BaseException as err:
            log.error("expert shard %d leaves its replica's group: %s", self.group.rank, err)
            raise

    def _introduce(self) -> None:
        info = ShardInfo(self.shard.hidden_size, self.shard.dtype, self.shard.experts).to_ints(self.num_experts)
        self._to_trunk(torch.tensor(info, dtype=torch.int64, device=self.device), Tag.INFO)

    @property
    def _message(self) -> torch.Tensor:
        """The header message being answered."""
        return self._messages[self._current]

    def _post_next_header(self) -> None:
        other = 1 - self._current
        self._next = (self.group.recv(self._messages[other], 0, Tag.HEADER), other)

    def _header(self) -> tuple[Op, int, list[int]]:
        """The next header: its receive was posted (into the other buffer) before the last answer went out."""
        assert self._next is not None, "every answer posts the next header's receive"
        work, self._current = self._next
        self._next = None
        self.group.wait(work, timeout_s=IDLE_TIMEOUT_S)
        return read_header(header_part(self._message, self.num_experts).tolist())

    def _step(self, layer: int, counts: list[int], *, lora: bool = False) -> None:
        hidden, dtype, total = self.shard.hidden_size, self.shard.dtype, sum(counts)
        inline = min(total, inline_rows(hidden, dtype))
        rows = rows_part(self._message, self.num_experts, inline, hidden, dtype)  # [inline, H], a view
        if total > inline:
            rest = torch.empty(total - inline, hidden, dtype=dtype, device=self.device)
            self._from_trunk(rest, Tag.ROWS)
            rows = torch.cat([rows, rest])
        row_slots = None
        if lora:
            row_slots = torch.empty(total, dtype=torch.int64, device=self.device)  # [R_s]
            self._from_trunk(row_slots, Tag.SLOTS)
        out = self.shard.compute(layer, counts, rows, row_slots=row_slots)  # [R_s, H]
        self._to_trunk(out.contiguous(), Tag.OUTPUTS, then_post_next=True)

    def _adapter(self, length: int) -> None:
        """Load, empty or check a bank slot's adapter; a shard that cannot (the adapter unreadable here) acks 0 and
        goes on."""
        payload = torch.empty(length, dtype=torch.int64, device=self.device)
        self._from_trunk(payload, Tag.PAYLOAD)
        action, slot, path, slots, max_rank = read_adapter_payload(payload.tolist())
        done = 1
        try:
            self.shard.set_adapter(AdapterAction(action), slot, path, slots=slots, max_rank=max_rank)
        except ValueError as err:  # an unknown action too
            log.error("expert shard %d cannot %s adapter %s (slot %d): %s", self.group.rank, action, path, slot, err)
            done = 0
        self._to_trunk(torch.tensor([done], dtype=torch.int64, device=self.device), Tag.ACK, then_post_next=True)

    def _place(self, length: int) -> None:
        payload = torch.empty(length, dtype=torch.int64, device=self.device)
        self._from_trunk(payload, Tag.PAYLOAD)
        values = payload.tolist()
        old = Placement.from_ints(values[1 : 1 + values[0]])
        new = Placement.from_ints(values[1 + values[0] :])
        me = self.group.rank - 1
        if old.shard_experts[me] != self.shard.experts:
            raise ValueError(f"the trunk's placement gives shard {me} experts {list(old.shard_experts[me])}, it holds "
                             f"{list(self.shard.experts)}")
        layers = {layer: self._move(weights, old, new) for layer, weights in sorted(self.shard.layers.items())}
        with self._lock:
            self.shard = ShardExperts(layers, hidden_size=self.shard.hidden_size, dtype=self.shard.dtype,
                                      config=self.shard.config)
        self._to_trunk(torch.ones(1, dtype=torch.int64, device=self.device), Tag.ACK, then_post_next=True)

    def _move(self, weights: ExpertWeights, old: Placement, new: Placement) -> ExpertWeights:
        """This layer's weights for the new placement: kept ones copied, others taken from the shards that hold
        them (one all_to_all of whole experts' bytes, [records, B])."""
        me, world = self.group.rank - 1, self.group.world_size
        moves = transfers(old, new)
        parts = _tensors(weights)
        per_expert = [p[0].numel() * p.element_size() for p in parts]
        index = {e: i for i, e in enumerate(weights.expert_ids)}
        outgoing = [m for target in range(new.num_shards) for m in moves if m.source == me and m.target == target]
        incoming = [m for source in range(new.num_shards) for m in moves if m.target == me and m.source == source]
        send = torch.empty(len(outgoing), sum(per_expert), dtype=torch.uint8, device=self.device)
        for row, move in enumerate(outgoing):
            send[row] = torch.cat([_expert_bytes(p, index[move.expert]) for p in parts])
        take = torch.empty(len(incoming), sum(per_expert), dtype=torch.uint8, device=self.device)
        out_splits = [0] * world
        in_splits = [0] * world
        for move in outgoing:
            in_splits[move.target + 1] += 1
        for move in incoming:
            out_splits[move.source + 1] += 1
        self.group.exchange(take, send, out_splits, in_splits)
        arrived = {move.expert: row for row, move in enumerate(incoming)}
        ids = new.shard_experts[me]
        rebuilt = []
        for part_index, part in enumerate(parts):
            offset = sum(per_expert[:part_index])
            whole = torch.empty((len(ids), *part.shape[1:]), dtype=part.dtype, device=self.device)
            for slot, expert in enumerate(ids):
                if expert in index:
                    whole[slot] = part[index[expert]]
                else:
                    raw = take[arrived[expert], offset : offset + per_expert[part_index]]
                    whole[slot] = raw.view(part.dtype).reshape(part.shape[1:])
            rebuilt.append(whole)
        return _rebuilt(weights, ids, rebuilt)

    def _from_trunk(self, tensor: torch.Tensor, tag: Tag, *, timeout_s: float | None = None) -> None:
        self.group.wait(self.group.recv(tensor, 0, tag), timeout_s=timeout_s)

    def _to_trunk(self, tensor: torch.Tensor, tag: Tag, *, then_post_next: bool = False) -> None:
        """Send to the trunk, and (answering a header message) post the next header's receive before waiting."""
        sent = self.group.send(tensor, 0, tag)
        if then_post_next:
            self._post_next_header()
        self.group.wait(sent)


def _tensors(weights: ExpertWeights) -> list[torch.Tensor]:
    """Every tensor of a layer's experts, each [experts, ...]: gate_up and down, or their values and scales."""
    out = []
    for weight in (weights.gate_up, weights.down):
        out += [weight.values, weight.scales] if isinstance(weight, QuantizedTensor) else [weight]
    return out


def _rebuilt(like: ExpertWeights, ids: tuple[int, ...], tensors: list[torch.Tensor]) -> ExpertWeights:
    """ExpertWeights of `ids` from _tensors-ordered tensors, shaped as `like`'s."""
    parts = iter(tensors)
    weights: list[torch.Tensor | QuantizedTensor] = []
    for weight in (like.gate_up, like.down):
        if isinstance(weight, QuantizedTensor):
            weights.append(QuantizedTensor(weight.scheme, next(parts), next(parts), weight.d_in, weight.group))
        else:
            weights.append(next(parts))
    return ExpertWeights(expert_ids=ids, gate_up=weights[0], down=weights[1])


def _expert_bytes(tensor: torch.Tensor, index: int) -> torch.Tensor:
    return tensor[index].contiguous().reshape(-1).view(torch.uint8)


__all__ = ["CollectiveShard", "info_size"]
