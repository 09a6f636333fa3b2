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

With M trunks (ranks 0..M-1; this shard is rank M + its index) a layer step is every trunk's header, read in rank
order (each trunk's next header's receive posted before the answer, as with one): they must agree on the layer
(and be steps; a trunk's STEP and another's LORA_STEP mix, the STEP trunk's rows on the base model), else the
shard logs and raises. All trunks' rows go through ONE ShardExperts.compute: per expert, trunk 0's rows, then trunk
1's, and so on (bigger expert GEMMs: the point of M:N), and each trunk gets its own rows' outputs back in its own
order. Control messages (adapters, stop) come from trunk 0 only: its header is read first, the others' only for a
step.
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
from herd.workers.trunk_rows import merge, merged_counts, split

log = logging.getLogger(__name__)


class CollectiveShard:
    """Rank `group.rank` of a replica: shard `group.rank - trunks` of the placement, holding `shard`'s experts."""

    def __init__(self, shard: ShardExperts, group: CollectiveGroup, num_experts: int, *, trunks: int = 1) -> None:
        if group.rank < trunks:
            raise ValueError(f"ranks 0..{trunks - 1} of a replica's group are its trunks, not shards: {group.rank}")
        self.shard, self.group, self.num_experts, self.trunks = shard, group, num_experts, trunks
        self.device = group.device
        self._lock = threading.Lock()  # shard swaps versus readers on other threads
        # Each trunk's header messages land in two buffers in turn: the receive of the next is posted before the
        # answer to this one is sent, so it is waiting when the trunk sends (at once, not after a gloo round trip),
        # while this one's inline rows are still in use.
        size = message_bytes(num_experts, shard.hidden_size, shard.dtype)
        self._header_messages = [[torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
                         for _ in range(trunks)]
        self._current = [0] * trunks  # per trunk, the buffer of the header message being answered
        self._next: list[tuple[Work, int] | None] = [None] * trunks  # per trunk, the posted receive and its buffer

    @property
    def experts(self) -> tuple[int, ...]:
        with self._lock:
            return self.shard.experts

    def serve(self) -> None:
        """Answer the trunk until it says stop (returns) or the group fails (raises, after logging why)."""
        try:
            for trunk in range(self.trunks):
                self._post_next_header(trunk)
            self._introduce()
            while True:
                op, argument, values = self._header()
                if op is Op.STOP:
                    return
                if op in (Op.STEP, Op.LORA_STEP) and self.trunks > 1:
                    self._steps(op, argument, values)
                elif op in (Op.STEP, Op.LORA_STEP):
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
        ints = torch.tensor(info, dtype=torch.int64, device=self.device)
        for sent in [self.group.send(ints, trunk, Tag.INFO) for trunk in range(self.trunks)]:
            self.group.wait(sent)

    @property
    def _message(self) -> torch.Tensor:
        """Trunk 0's header message being answered."""
        return self._header_messages[0][self._current[0]]

    def _post_next_header(self, trunk: int = 0) -> None:
        other = 1 - self._current[trunk]
        self._next[trunk] = (self.group.recv(self._header_messages[trunk][other], trunk, Tag.HEADER), other)

    def _header(self, trunk: int = 0, timeout_s: float = IDLE_TIMEOUT_S) -> tuple[Op, int, list[int]]:
        """A trunk's next header: its receive was posted (into the other buffer) before the last answer went out."""
        posted = self._next[trunk]
        assert posted is not None, "every answer posts the next header's receive"
        work, self._current[trunk] = posted
        self._next[trunk] = None
        self.group.wait(work, timeout_s=timeout_s)
        return read_header(header_part(self._header_messages[trunk][self._current[trunk]], self.num_experts).tolist())

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

    def _steps(self, op: Op, layer: int, counts: list[int]) -> None:
        """A layer step of several trunks (trunk 0's header read): the others' headers, every trunk's rows computed
        in one call, each trunk's outputs sent back (to those that sent rows)."""
        heads = [(op, layer, counts)] + [self._header(t, self.group.rendezvous.timeout_s)
                                         for t in range(1, self.trunks)]
        for trunk, (other, other_layer, values) in enumerate(heads):
            if other not in (Op.STEP, Op.LORA_STEP) or other_layer != layer:
                raise ValueError(f"protocol error: trunk 0 sent {op.name} of layer {layer}, trunk {trunk} "
                                 f"{other.name} of layer {other_layer} (the trunks are out of step)")
            if len(values) != len(self.shard.experts):
                raise ValueError(f"protocol error: trunk {trunk} sent {len(values)} counts for layer {layer}; this "
                                 f"shard holds {len(self.shard.experts)} experts")
        per_trunk = [values for _, _, values in heads]  # [M][E']
        hidden, dtype = self.shard.hidden_size, self.shard.dtype
        lora = any(o is Op.LORA_STEP for o, _, _ in heads)
        rows, slots, receives = [], [], []
        for trunk, (other, _, values) in enumerate(heads):
            total = sum(values)
            inline = min(total, inline_rows(hidden, dtype))
            message = self._header_messages[trunk][self._current[trunk]]
            part = [rows_part(message, self.num_experts, inline, hidden, dtype)]  # [inline, H], a view
            if total > inline:
                part.append(torch.empty(total - inline, hidden, dtype=dtype, device=self.device))
                receives.append(self.group.recv(part[-1], trunk, Tag.ROWS))
            rows.append(part)
            slots.append(torch.zeros(total, dtype=torch.int64, device=self.device))  # [R_t]; 0: the base model
            if other is Op.LORA_STEP and total:
                receives.append(self.group.recv(slots[-1], trunk, Tag.SLOTS))
        for work in receives:
            self.group.wait(work)
        batch = merge(per_trunk, [torch.cat(part) if len(part) > 1 else part[0] for part in rows])  # [R, H]
        row_slots = merge(per_trunk, slots) if lora else None  # [R]
        out = self.shard.compute(layer, merged_counts(per_trunk), batch, row_slots=row_slots)  # [R, H]
        outputs = split(per_trunk, out)  # [M] of [R_t, H], kept until sent
        sent = [self.group.send(part, trunk, Tag.OUTPUTS) for trunk, part in enumerate(outputs) if part.shape[0]]
        for trunk in range(self.trunks):
            self._post_next_header(trunk)
        for work in sent:
            self.group.wait(work)

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
        if self.trunks > 1:
            raise ValueError(f"protocol error: a re-placement with {self.trunks} trunks (one trunk only)")
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
