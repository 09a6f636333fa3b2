"""Which trunk of a replica takes a new request (issue 28): a pure decision over what each trunk holds.

The trunks of a replica step in lockstep, so a step lasts as long as its busiest trunk's: requests go where KV use
(and so attention work) is least. A trunk whose prefix cache holds the start of the prompt saves its prefill, so it
wins while it is not much busier than the least busy one (the same trade as the replica router's prefix routing,
herd.workers.prefix_affinity, one level down).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PREFIX_IMBALANCE_REQUESTS = 8
"""How many more requests than the least loaded trunk a prefix-cache hit may cost before load wins."""


@dataclass(frozen=True)
class TrunkLoad:
    kv_blocks_held: int  # KV blocks in use by its sequences
    requests: int  # unfinished requests
    prefix_blocks: int = 0  # blocks of this prompt's prefix its cache holds


def choose_trunk(loads: Sequence[TrunkLoad], *, imbalance: int = PREFIX_IMBALANCE_REQUESTS) -> int:
    """The index of the trunk to take a request: the longest prefix hit among those within `imbalance` requests of
    the least loaded, else the least KV held, then the fewest requests, then the lowest index."""
    if not loads:
        raise ValueError("a replica has at least one trunk")
    fewest = min(load.requests for load in loads)
    near = [i for i, load in enumerate(loads) if load.requests <= fewest + imbalance and load.prefix_blocks]
    if near:
        return max(near, key=lambda i: (loads[i].prefix_blocks, -loads[i].kv_blocks_held, -loads[i].requests, -i))
    return min(range(len(loads)), key=lambda i: (loads[i].kv_blocks_held, loads[i].requests, i))
