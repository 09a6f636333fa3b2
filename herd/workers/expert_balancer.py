"""Live expert balancing in a replica: every so many steps, between two of them, re-place the experts when the
load measured since the last look says it pays (herd.workers.balance plans; the dispatcher and its collective
transport move the weights shard to shard).

Legend: E experts, S shards, L MoE layers. The load is herd.workers.expert_load's per-expert token counts of every
MoE layer; the window is what came since the last look. One placement serves every layer: it is planned from
their sum and judged layer by layer (herd.workers.balance.rebalance). Each shard may
hold ceil(E/S) + `spare_slots` experts, so copies of hot experts cost a bounded amount of memory. A failed move is
logged and ends balancing for this replica (a broken group already makes it unhealthy; anything else is a bug to
look at, not to retry every interval).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from herd.engine.errors import HerdError
from herd.workers.balance import rebalance
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.placement import Placement
from herd.workers.replica_config import ExpertBalance

log = logging.getLogger(__name__)


class ExpertBalancer:
    """Call `between_steps()` on the engine's thread before every step."""

    def __init__(self, dispatcher: ExpertDispatcher, config: ExpertBalance, moe_layers: Sequence[int], *,
                 on_replace: Callable[[float], None] | None = None) -> None:
        self.dispatcher, self.config, self.on_replace = dispatcher, config, on_replace
        placement = dispatcher.placement
        self.slots_per_shard = math.ceil(placement.num_experts / placement.num_shards) + config.spare_slots
        self.replacements = 0
        self.stopped: str | None = None  # why balancing ended, if it did
        self._steps = 0
        self._layers = moe_layers
        self._seen = self._totals()

    def between_steps(self) -> Placement | None:
        """The placement moved to, when this look moved one."""
        self._steps += 1
        if self.stopped is not None or self._steps % self.config.interval_steps:
            return None
        totals = self._totals()  # [L, E]
        window, self._seen = totals - self._seen, totals
        if window.sum() < self.config.min_tokens:
            return None
        plan = rebalance(window.sum(0).tolist(), self.dispatcher.placement, slots_per_shard=self.slots_per_shard,
                         min_gain=self.config.min_gain, layer_loads=window.tolist())
        if plan is None:
            return None
        start = time.perf_counter()
        try:
            self.dispatcher.replace(plan)
        except (HerdError, ValueError) as err:
            self.stopped = str(err)
            log.error("expert balancing stops for this replica: re-placing the experts failed: %s", err)
            return None
        seconds = time.perf_counter() - start
        self.replacements += 1
        log.info("experts re-placed in %.2f s after %d steps: shards hold %s", seconds, self._steps,
                 [list(experts) for experts in plan.shard_experts])
        if self.on_replace is not None:
            self.on_replace(seconds)
        return plan

    def _totals(self) -> np.ndarray:
        """Tokens routed to each expert of each MoE layer so far: [L, E] (L: the model's MoE layers)."""
        snapshot = self.dispatcher.load.snapshot()
        totals = np.zeros((len(self._layers), self.dispatcher.placement.num_experts), dtype=np.int64)
        for row, layer in enumerate(self._layers):
            if layer in snapshot:
                totals[row] = snapshot[layer]
        return totals


__all__ = ["ExpertBalancer"]
