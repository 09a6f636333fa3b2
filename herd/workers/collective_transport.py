"""Expert shards reached over the replica's collective group: rows move rank to rank, no serialisation.

Legend: R rows of a layer step, R_s shard s's, H hidden, N shards, HS header ints.

Per MoE layer the trunk starts, for each shard with rows, a send of its header (its counts) with its rows inline
(a second message for rows beyond a decode step's) and a receive of its outputs, all at once
(herd.workers.collective_protocol); the wait function waits for them, so whatever the caller does between submit
and wait (the shared expert) overlaps the shards' work. On CUDA (NCCL) the rows never leave the device (they are
copied into the header message there); the counts are the host's already (the dispatcher reads the offsets to
cut the rows). With LoRA, a layer step's row slots follow its rows, and adapters go to the shards as their paths
(the shards read them).

A failed or late operation is a HerdError (UNAVAILABLE or DEADLINE_EXCEEDED) with a generic message (the
detail goes to the log); the group is then broken and `healthy()` False. With `restartable` the replica restarts the
dead shard in place (herd.workers.shard_recovery): `leave` tells the surviving shards to stop serving the broken
group and drops it, `rejoin` takes the new group of every rank (the restarted one too); the engine holds the steps
that failed meanwhile. Without it the error carries reason experts_lost (never held) and the replica is restarted
whole by whoever hosts it.

M trunks (issue 28, `trunks` > 1): trunk ranks 0..M-1 share the shards (ranks M..M+N-1) in lockstep. Every trunk
takes part in every MoE layer step: it sends EVERY shard a header (zero counts where it has no rows for it) and
waits for outputs only from the shards it sent rows to; a trunk with nothing to run calls `idle_step` (an empty
header per MoE layer) so its busy peers never wait for it. Each shard computes all trunks' rows of a layer in one
call (bigger expert GEMMs). Control (adapters, stop) goes from trunk 0 only: the other trunks' adapter calls raise
ValueError, and their `close` only leaves the group. Live re-placement (`replace`) and in-place shard restart
(`restartable`, `leave`, `rejoin`) are refused with M > 1 (ValueError): the shards' weight exchange and the re-formed
group assume one trunk. With M == 1 (the default) nothing changes: only shards with rows hear from the trunk.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch._C._distributed_c10d import Work

from herd.engine.errors import Code, HerdError
from herd.engine.fault_hold import EXPERTS_LOST
from herd.model.lora import LoRAAdapter
from herd.workers.collective import CollectiveError, CollectiveGroup
from herd.workers.collective_protocol import (
    Op,
    ShardInfo,
    Tag,
    adapter_payload,
    header,
    header_part,
    info_size,
    inline_rows,
    message_bytes,
    rows_part,
)
from herd.workers.placement import Placement
from herd.workers.shard_experts import AdapterAction
from herd.workers.transport import ShardWork, TransportStats

log = logging.getLogger(__name__)

PLACE_TIMEOUT_S = 600.0
"""A re-placement's deadline at least: every moved expert's weights of every layer cross between shards."""


class CollectiveTransport:
    """A trunk's side (rank < `trunks`) of a replica's group; `probe` says whether the shard processes are alive.
    `layers`: the model's MoE layer indexes in order (what `idle_step` sends; needed with `trunks` > 1)."""

    def __init__(self, group: CollectiveGroup, *, num_experts: int, moe_layers: int, hidden_size: int,
                 dtype: torch.dtype, timeout_s: float, probe: Callable[[], bool] | None = None,
                 restartable: bool = False, trunks: int = 1, layers: Sequence[int] | None = None) -> None:
        if not 1 <= trunks < group.world_size:
            raise ValueError(f"{trunks} trunks do not leave a shard in a group of {group.world_size}")
        if not 0 <= group.rank < trunks:
            raise ValueError(f"a trunk is one of ranks 0..{trunks - 1} of its replica's group, not {group.rank}")
        if trunks > 1 and restartable:
            raise ValueError(f"restarting a shard in place is not supported with {trunks} trunks (the re-formed "
                             "group assumes one trunk): restart the replica whole")
        if layers is not None and len(layers) != moe_layers:
            raise ValueError(f"layers {list(layers)} are not the model's {moe_layers} MoE layers")
        if trunks > 1 and layers is None:
            raise ValueError(f"{trunks} trunks need the MoE layers' indexes (`layers`): an idle trunk steps them")
        self.group, self.num_experts, self.moe_layers = group, num_experts, moe_layers
        self.hidden_size, self.dtype, self.timeout_s = hidden_size, dtype, timeout_s
        self.trunks, self.layers = trunks, tuple(layers) if layers is not None else None
        self.device = group.device
        self.num_shards = group.world_size - trunks
        self.stats = TransportStats()
        self._probe = probe
        self.restartable = restartable
        self._in_flight = 0  # layer steps submitted and not yet waited for (ping-pong micro-batches: several)
        self._experts = [info.experts for info in self._introductions()]
        self._inline = inline_rows(hidden_size, dtype)
        self._message_bytes = message_bytes(num_experts, hidden_size, dtype)

    def shard_experts(self) -> list[tuple[int, ...]]:
        return list(self._experts)

    def run(self, layer: int, work: list[ShardWork]) -> list[torch.Tensor]:
        return self.submit(layer, work)()

    def submit(self, layer: int, work: list[ShardWork]) -> Callable[[], list[torch.Tensor]]:
        """Send every shard with rows its header and rows (with several trunks, every shard its header: zero counts
        where no rows); the function waits for and returns each shard's outputs [R_s, H] (a shard without rows this
        layer gives its empty rows back)."""
        if len(work) != self.num_shards:
            raise ValueError(f"work for {len(work)} shards, this replica has {self.num_shards}")
        start = time.perf_counter()
        sizes = [item.rows.shape[0] for item in work]
        told = [s for s, size in enumerate(sizes) if size or self.trunks > 1]  # shard indexes
        op = Op.STEP if all(item.row_slots is None for item in work) else Op.LORA_STEP
        heads = torch.tensor([header(op, layer, list(work[s].counts), self.num_experts) for s in told],
                             dtype=torch.int64).to(self.device, non_blocking=True)  # [told, HS]
        messages = self._messages(heads)  # [told, message bytes]
        outputs = [item.rows.new_empty(item.rows.shape) for item in work]  # [R_s, H] each
        operations = []
        for row, s in enumerate(told):
            rank, rows, inline = self.trunks + s, work[s].rows, min(sizes[s], self._inline)
            rows_part(messages[row], self.num_experts, inline, self.hidden_size, self.dtype).copy_(rows[:inline])
            operations.append((messages[row], rank, Tag.HEADER, False))
            if not sizes[s]:  # several trunks: the header alone keeps the shard in step
                continue
            if sizes[s] > inline:
                operations.append((rows[inline:].contiguous(), rank, Tag.ROWS, False))
            if op is Op.LORA_STEP:
                row_slots = work[s].row_slots
                if row_slots is None or row_slots.shape != (sizes[s],):
                    raise ValueError(f"shard {s}: row slots must be given for each of its rows, or for none")
                operations.append((row_slots.to(self.device, torch.int64).contiguous(), rank, Tag.SLOTS, False))
            operations.append((outputs[s], rank, Tag.OUTPUTS, True))
        pending = self._start(operations)
        self.stats.calls += 1
        self._in_flight += 1

        def wait() -> list[torch.Tensor]:
            waited = time.perf_counter()
            try:
                self._wait(pending)
            finally:
                self._in_flight -= 1
            self.stats.wait_s += time.perf_counter() - waited
            self.stats.compute_s += time.perf_counter() - start
            return outputs

        return wait

    def idle_step(self) -> None:
        """With several trunks, a forward's worth of nothing: every shard an empty header for every MoE layer, in
        layer order (all started at once: each lands when the shard reaches that layer, so the busy trunks never
        wait for this one), waited for. Call it for each forward the other trunks run while this one has none."""
        if self.layers is None:
            raise ValueError("idle_step needs the MoE layers' indexes (`layers`)")
        heads = torch.tensor([header(Op.STEP, layer, [0] * len(experts), self.num_experts)
                              for layer in self.layers for experts in self._experts],
                             dtype=torch.int64, device=self.device)  # [layers * N, HS]: zero counts
        messages = self._messages(heads)  # [layers * N, message bytes]
        ranks = [rank for _ in self.layers for rank in self._shard_ranks()]
        self._in_flight += 1
        try:
            self._wait(self._start([(message, rank, Tag.HEADER, False) for message, rank in zip(messages, ranks,
                                                                                                strict=True)]))
        finally:
            self._in_flight -= 1
        self.stats.calls += len(self.layers)

    def load_adapter(self, slot: int, adapter: LoRAAdapter, *, slots: int, max_rank: int) -> None:
        """Every shard reads the adapter from its path into bank slot `slot`; between steps."""
        self._set_adapter(adapter_payload(AdapterAction.LOAD, slot, str(adapter.path), slots, max_rank),
                          f"load adapter {adapter.path}")

    def unload_adapter(self, slot: int) -> None:
        self._set_adapter(adapter_payload(AdapterAction.UNLOAD, slot, "", 0, 0), f"empty slot {slot}")

    def check_adapter(self, adapter: LoRAAdapter) -> None:
        self._set_adapter(adapter_payload(AdapterAction.CHECK, 0, str(adapter.path), 0, 0),
                          f"read adapter {adapter.path}")

    def _set_adapter(self, values: list[int], what: str) -> None:
        self._control(what)
        payload = torch.tensor(values, dtype=torch.int64, device=self.device)
        head = self._messages(torch.tensor([header(Op.ADAPTER, payload.shape[0], [], self.num_experts)],
                                           dtype=torch.int64, device=self.device))[0]
        acks = torch.zeros(self.num_shards, 1, dtype=torch.int64, device=self.device)
        shards = self._shard_ranks()
        self._wait(self._start([(t, rank, tag, False) for rank in shards
                                for t, tag in ((head, Tag.HEADER), (payload, Tag.PAYLOAD))]))
        self._wait(self._start([(acks[s], rank, Tag.ACK, True) for s, rank in enumerate(shards)]))
        refused = [s for s in range(self.num_shards) if acks[s].item() != 1]
        if refused:
            raise HerdError(Code.INTERNAL, f"expert shard(s) {refused} could not {what} (see the shards' logs)")

    def replace(self, old: Placement, new: Placement) -> None:
        """Move experts between the shards to `new` (the shards copy weights among themselves; the trunk only
        tells them and waits for their acks). Call between steps. One trunk only (ValueError with more: the weight
        exchange is an all_to_all every rank takes part in, the other trunks included)."""
        self._one_trunk("re-placing experts live")
        if old.shard_experts != tuple(self._experts):
            raise ValueError(f"the shards hold {self._experts}, not the old placement's {old.shard_experts}")
        if new.num_shards != self.num_shards or new.num_experts != self.num_experts:
            raise ValueError(f"a placement of {new.num_experts} experts over {new.num_shards} shards does not fit "
                             f"this replica's {self.num_experts} over {self.num_shards}")
        before, after = old.to_ints(), new.to_ints()
        payload = torch.tensor([len(before), *before, *after], dtype=torch.int64, device=self.device)
        head = self._messages(torch.tensor([header(Op.PLACE, payload.shape[0], [], self.num_experts)],
                                           dtype=torch.int64, device=self.device))[0]
        acks = torch.zeros(self.num_shards, 1, dtype=torch.int64, device=self.device)
        shards = range(1, self.num_shards + 1)
        timeout_s = max(self.timeout_s, PLACE_TIMEOUT_S)
        self._wait(self._start([(t, rank, tag, False) for rank in shards
                                for t, tag in ((head, Tag.HEADER), (payload, Tag.PAYLOAD))]), timeout_s=timeout_s)
        nothing = torch.empty(0, 1, dtype=torch.uint8, device=self.device)
        none = [0] * self.group.world_size
        for _ in range(self.moe_layers):  # the shards' weight exchange, one all_to_all per layer
            try:
                self.group.wait(self.group.all_to_all(nothing, nothing, none, none, timeout_s=timeout_s),
                                timeout_s=timeout_s)
            except CollectiveError as err:
                raise _failed(err, timeout_s, self.restartable) from err
        self._wait(self._start([(acks[rank - 1], rank, Tag.ACK, True) for rank in shards]), timeout_s=timeout_s)
        if acks.sum().item() != self.num_shards:
            raise HerdError(Code.INTERNAL, "an expert shard did not take the new placement")
        self._experts = list(new.shard_experts)

    def healthy(self) -> bool:
        return self.group.broken is None and (self._probe is None or self._probe())

    def leave(self, alive: list[int]) -> None:
        """Between steps, a shard having died: tell the shards in `alive` (indexes) to stop serving this group (its
        pairs to them still carry a message when the dead one's are closed) and drop it; they can then join the next
        (`rejoin`). Steps fail meanwhile (UNAVAILABLE). One trunk only."""
        self._one_trunk("restarting a shard in place")
        stop = self._messages(torch.tensor([header(Op.STOP, 0, [], self.num_experts)], dtype=torch.int64,
                                           device=self.device))[0]
        try:
            for work in [self.group.send_anyway(stop, index + self.trunks, Tag.HEADER) for index in alive]:
                work.wait(datetime.timedelta(seconds=5.0))
        except RuntimeError as err:  # a survivor that does not stop fails to join the next group, and says so
            log.warning("telling the surviving expert shards to leave the broken group failed: %s", err)
        self.group.close()

    def rejoin(self, group: CollectiveGroup) -> None:
        """Between steps: serve the shards over `group` from now on (every rank joined it, the restarted shard
        too); ValueError unless the shards hold what they held before. One trunk only."""
        self._one_trunk("restarting a shard in place")
        if group.rank != 0 or group.world_size != self.num_shards + 1:
            raise ValueError(f"a group of {group.world_size} with the trunk as rank {group.rank} does not fit "
                             f"{self.num_shards} shards")
        before, self.group = self._experts, group
        experts = [info.experts for info in self._introductions()]
        if experts != before:
            raise ValueError(f"the re-formed group's shards hold {experts}, not {before}")

    def close(self) -> None:
        """Tell the shards to stop (when the group still works and no step is using it: a replica drains on
        another thread than its engine's, and a stop sent into a step's messages would garble both), then leave
        the group; shards told nothing see their trunk's connections close. Of several trunks only trunk 0 tells
        the shards to stop: close it last."""
        if self.group.broken is None and not self._in_flight and self.group.rank == 0:
            stop = self._messages(torch.tensor([header(Op.STOP, 0, [], self.num_experts)], dtype=torch.int64,
                                               device=self.device))[0]
            with contextlib.suppress(HerdError):  # the shards are gone already: nothing to stop
                self._wait(self._start([(stop, rank, Tag.HEADER, False) for rank in self._shard_ranks()]),
                           timeout_s=5.0)
        self.group.close()

    def _introductions(self) -> list[ShardInfo]:
        infos = torch.empty(self.num_shards, info_size(self.num_experts), dtype=torch.int64, device=self.device)
        self._wait(self._start([(infos[s], rank, Tag.INFO, True) for s, rank in enumerate(self._shard_ranks())]))
        out = [ShardInfo.from_ints(row) for row in infos.tolist()]
        for s, info in enumerate(out):
            if info.hidden_size != self.hidden_size or info.dtype != self.dtype:
                raise ValueError(f"expert shard {s} computes [R, {info.hidden_size}] in {info.dtype}; the trunk "
                                 f"sends [R, {self.hidden_size}] in {self.dtype}")
        return out

    def _shard_ranks(self) -> range:
        return range(self.trunks, self.trunks + self.num_shards)

    def _one_trunk(self, what: str) -> None:
        if self.trunks > 1:
            raise ValueError(f"{what} is not supported with {self.trunks} trunks sharing the shards")

    def _control(self, what: str) -> None:
        """Adapters and the like go to the shards from trunk 0 only (they read its header first)."""
        if self.group.rank != 0:
            raise ValueError(f"only trunk 0 of {self.trunks} controls the shards (asked to {what} by trunk "
                             f"{self.group.rank})")

    def _messages(self, heads: torch.Tensor) -> torch.Tensor:
        """Header messages of these headers [n, HS], their rows' room left for the caller: [n, message bytes]."""
        out = torch.empty(heads.shape[0], self._message_bytes, dtype=torch.uint8, device=self.device)
        for message, head in zip(out, heads, strict=True):
            header_part(message, self.num_experts).copy_(head)
        return out

    def _start(self, operations: list[tuple[torch.Tensor, int, Tag, bool]]) -> list[Work]:
        """Start each (tensor, rank, tag, receive?) at once; their Works, to wait for (and keep till then)."""
        try:
            return [self.group.recv(tensor, rank, tag) if receive else self.group.send(tensor, rank, tag)
                    for tensor, rank, tag, receive in operations]
        except CollectiveError as err:
            raise _failed(err, self.timeout_s, self.restartable) from err

    def _wait(self, pending: list[Work], *, timeout_s: float | None = None) -> None:
        try:
            for work in pending:
                self.group.wait(work, timeout_s=timeout_s or self.timeout_s)
        except CollectiveError as err:
            raise _failed(err, timeout_s or self.timeout_s, self.restartable) from err


def _failed(err: CollectiveError, timeout_s: float, restartable: bool) -> HerdError:
    """The step's error. The group is broken for good: unless the replica restarts the shard in place and re-forms
    the group (restartable: the engine holds the step meanwhile), the engine must not hold the step for it
    (EXPERTS_LOST): the replica is restarted, and the gateway continues its requests elsewhere."""
    log.error("the replica's collective group failed: %s", err)
    reason = None if restartable else EXPERTS_LOST
    if err.timed_out:
        return HerdError(Code.DEADLINE_EXCEEDED, f"an expert shard did not answer within {timeout_s:g} s",
                         reason=reason)
    return HerdError(Code.UNAVAILABLE, "an expert shard of this replica is unavailable", reason=reason)
