"""Expert shards reached over the replica's collective group: rows move rank to rank, no serialisation.

Legend: R rows of a layer step, R_s shard s's, H hidden, N shards, W = N + 1 ranks, HS header ints.

Per MoE layer the trunk starts three all_to_alls at once (herd.workers.collective_protocol): each shard's header
(its counts), the rows themselves (one buffer, shard after shard), and the way back into one [R, H] buffer; the wait
function waits for them, so whatever the caller does between submit and wait (the shared expert) overlaps the
shards' work. On CUDA (NCCL) the rows never leave the device; the counts are the host's already (the dispatcher
reads the offsets to cut the rows). A failed or late collective is a HerdError (UNAVAILABLE or DEADLINE_EXCEEDED)
with a generic message (the detail goes to the log); the group is then broken, `healthy()` is False for good, and
the replica is restarted by whoever hosts it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import torch

from herd.engine.errors import Code, HerdError
from herd.workers.collective import CollectiveError, CollectiveGroup
from herd.workers.collective_protocol import Op, ShardInfo, header, info_size
from herd.workers.placement import Placement
from herd.workers.transport import ShardWork, TransportStats

log = logging.getLogger(__name__)

PLACE_TIMEOUT_S = 600.0
"""A re-placement's deadline at least: every moved expert's weights of every layer cross between shards."""


class CollectiveTransport:
    """The trunk's side (rank 0) of a replica's group; `probe` says whether the shard processes are alive."""

    def __init__(self, group: CollectiveGroup, *, num_experts: int, moe_layers: int, hidden_size: int,
                 dtype: torch.dtype, timeout_s: float, probe: Callable[[], bool] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        if group.rank != 0:
            raise ValueError(f"the trunk is rank 0 of its replica's group, not {group.rank}")
        self.group, self.num_experts, self.moe_layers = group, num_experts, moe_layers
        self.hidden_size, self.dtype, self.timeout_s = hidden_size, dtype, timeout_s
        self.device = group.device
        self.num_shards = group.world_size - 1
        self.stats = TransportStats()
        self._probe, self._on_close = probe, on_close
        self._experts = [info.experts for info in self._introductions()]

    def shard_experts(self) -> list[tuple[int, ...]]:
        return list(self._experts)

    def run(self, layer: int, work: list[ShardWork]) -> list[torch.Tensor]:
        return self.submit(layer, work)()

    def submit(self, layer: int, work: list[ShardWork]) -> Callable[[], list[torch.Tensor]]:
        """Send every shard its rows; the function waits for and returns each shard's outputs [R_s, H]."""
        if len(work) != self.num_shards:
            raise ValueError(f"work for {len(work)} shards, this replica has {self.num_shards}")
        start = time.perf_counter()
        sizes = [item.rows.shape[0] for item in work]
        headers = [header(Op.STEP, layer, list(item.counts), self.num_experts) for item in work]
        head = torch.tensor(headers, dtype=torch.int64).to(self.device, non_blocking=True)  # [N, HS]
        rows = torch.cat([item.rows for item in work]) if len(work) > 1 else work[0].rows.contiguous()  # [R, H]
        back = torch.empty_like(rows)
        to_shards, none = [0, *sizes], [0] * self.group.world_size
        pending = self._start([
            (head[:0], head, none, [0] + [1] * self.num_shards),
            (rows[:0], rows, none, to_shards),
            (back, back[:0], to_shards, none),
        ])
        self.stats.calls += 1

        def wait() -> list[torch.Tensor]:
            waited = time.perf_counter()
            self._wait(pending)
            self.stats.wait_s += time.perf_counter() - waited
            self.stats.compute_s += time.perf_counter() - start
            return list(torch.split(back, sizes))

        return wait

    def replace(self, old: Placement, new: Placement) -> None:
        """Move experts between the shards to `new` (the shards copy weights among themselves; the trunk only
        tells them and waits for their acks). Call between steps."""
        if old.shard_experts != tuple(self._experts):
            raise ValueError(f"the shards hold {self._experts}, not the old placement's {old.shard_experts}")
        if new.num_shards != self.num_shards or new.num_experts != self.num_experts:
            raise ValueError(f"a placement of {new.num_experts} experts over {new.num_shards} shards does not fit "
                             f"this replica's {self.num_experts} over {self.num_shards}")
        before, after = old.to_ints(), new.to_ints()
        payload = torch.tensor([len(before), *before, *after], dtype=torch.int64, device=self.device)
        none, each = [0] * self.group.world_size, [0] + [1] * self.num_shards
        head = torch.tensor([header(Op.PLACE, payload.shape[0], [], self.num_experts)] * self.num_shards,
                            dtype=torch.int64, device=self.device)
        nothing = torch.empty(0, 1, dtype=torch.uint8, device=self.device)
        acks = torch.zeros(self.num_shards, 1, dtype=torch.int64, device=self.device)
        steps = [(head[:0], head, none, each),
                 (payload[:0], payload.repeat(self.num_shards), none, [0] + [payload.shape[0]] * self.num_shards)]
        steps += [(nothing, nothing, none, none)] * self.moe_layers  # the shards' weight exchange, one per layer
        steps += [(acks, acks[:0], each, none)]
        timeout_s = max(self.timeout_s, PLACE_TIMEOUT_S)
        self._wait(self._start(steps, timeout_s=timeout_s), timeout_s=timeout_s)
        if acks.sum().item() != self.num_shards:
            raise HerdError(Code.INTERNAL, "an expert shard did not take the new placement")
        self._experts = list(new.shard_experts)

    def healthy(self) -> bool:
        return self.group.broken is None and (self._probe is None or self._probe())

    def close(self) -> None:
        """Tell the shards to stop (when the group still works), then leave it."""
        if self.group.broken is None:
            stop = [header(Op.STOP, 0, [], self.num_experts)] * self.num_shards
            head = torch.tensor(stop, dtype=torch.int64, device=self.device)  # [N, HS]
            with contextlib.suppress(HerdError):  # the shards are gone already: nothing to stop
                self._wait(self._start([(head[:0], head, [0] * self.group.world_size, [0] + [1] * self.num_shards)]),
                           timeout_s=5.0)
        self.group.close()
        if self._on_close is not None:
            self._on_close()

    def _introductions(self) -> list[ShardInfo]:
        size = info_size(self.num_experts)
        infos = torch.empty(self.num_shards, size, dtype=torch.int64, device=self.device)
        self._wait(self._start([(infos, infos[:0], [0] + [1] * self.num_shards, [0] * self.group.world_size)]))
        out = [ShardInfo.from_ints(row) for row in infos.tolist()]
        for rank, info in enumerate(out, start=1):
            if info.hidden_size != self.hidden_size or info.dtype != self.dtype:
                raise ValueError(f"expert shard {rank} computes [R, {info.hidden_size}] in {info.dtype}; the trunk "
                                 f"sends [R, {self.hidden_size}] in {self.dtype}")
        return out

    def _start(self, steps: list[tuple[torch.Tensor, torch.Tensor, list[int], list[int]]], *,
               timeout_s: float | None = None) -> list[object]:
        try:
            return [self.group.all_to_all(output, input, out_splits, in_splits, timeout_s=timeout_s or self.timeout_s)
                    for output, input, out_splits, in_splits in steps]
        except CollectiveError as err:
            raise _failed(err, self.timeout_s) from err

    def _wait(self, pending: list[object], *, timeout_s: float | None = None) -> None:
        try:
            for work in pending:
                self.group.wait(work, timeout_s=timeout_s or self.timeout_s)  # type: ignore[arg-type]
        except CollectiveError as err:
            raise _failed(err, timeout_s or self.timeout_s) from err


def _failed(err: CollectiveError, timeout_s: float) -> HerdError:
    log.error("the replica's collective group failed: %s", err)
    if err.timed_out:
        return HerdError(Code.DEADLINE_EXCEEDED, f"an expert shard did not answer within {timeout_s:g} s")
    return HerdError(Code.UNAVAILABLE, "an expert shard of this replica is unavailable")
