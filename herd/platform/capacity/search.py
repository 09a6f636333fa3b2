"""`herd plan --search`: every M:N layout of one replica on G GPUs, ranked by how far each stretches.

The search tries M = 1..G-1 trunks with N = G - M expert shards (M = 1 also as today's plan does, the
shards on GPUs 1..G-1 or sharing GPU 0 with the trunk: see herd.platform.capacity.plan), context
parallelism off and on (on only where M > 1: one trunk has nothing to split over), and each KV dtype
asked for (the CLI's rule: the one --kv-dtype names, else bf16 and fp8). The weight format is not
searched: it is the checkpoint's, or --weights.

Ranking: the longest context for the requested sequences first, then the largest batch at the requested
context, then the least memory on the fullest GPU at the requested workload, then the layouts the
runtime serves today (M = 1 without context parallelism), fewer trunks, a wider KV dtype. The best
layout is the first that fits the request; when none does, the first is the closest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from herd.model.config import TextConfig
from herd.model.vision_config import VisionConfig
from herd.platform.capacity.gpus import GpuType
from herd.platform.capacity.memory import Workload
from herd.platform.capacity.plan import Plan, plan


@dataclass(frozen=True)
class Search:
    plans: tuple[Plan, ...]
    """Every layout tried, best first."""

    @property
    def fits(self) -> bool:
        return any(p.fits for p in self.plans)

    @property
    def best(self) -> Plan:
        """The best layout that fits the request, else the one coming closest."""
        return next((p for p in self.plans if p.fits), self.plans[0])


def _rank(p: Plan) -> tuple[int, int, int, int, bool, int]:
    return (-p.largest_context, -p.largest_batch, p.worst_gpu.over_bytes, p.trunks,
            p.context_parallel, -p.load.kv_value_bytes)


def search(text: TextConfig, vision: VisionConfig | None, *, weight_format: str, gpu: GpuType, num_gpus: int,
           load: Workload, kv_dtypes: Sequence[str], memory_utilization: float = 0.90) -> Search:
    """Plans of every layout (M trunks, context parallelism, KV dtype) of `num_gpus` GPUs, best first."""
    if not kv_dtypes:
        raise ValueError("the search needs at least one KV dtype")
    plans = []
    for kv_dtype in kv_dtypes:
        use = dataclasses.replace(load, kv_dtype=kv_dtype)
        for trunks in range(1, max(2, num_gpus)):
            for context_parallel in (False, True) if trunks > 1 else (False,):
                plans.append(plan(text, vision, weight_format=weight_format, gpu=gpu, num_gpus=num_gpus, load=use,
                                  memory_utilization=memory_utilization, trunks=trunks,
                                  context_parallel=context_parallel))
    return Search(plans=tuple(sorted(plans, key=_rank)))
