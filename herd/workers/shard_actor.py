"""An expert shard as a Ray actor inside its replica's placement group: a gRPC server, and Ray-callable too.

It listens on loopback (`listen="loopback"`: the trunk is on the same node, its placement group being
STRICT_PACK), or on its node's address with mutual TLS (`listen="node"`, for shards spread over nodes).
"""

from __future__ import annotations

import ray
import torch

from herd.model.dtypes import to_dtype
from herd.workers.expert_shard import DEFAULT_STEP_TOKENS
from herd.workers.expert_shard import serve as serve_shard
from herd.workers.process_setup import ProcessSetup
from herd.workers.shard_tls import ShardTls, check_shard_listen

LOOPBACK = "127.0.0.1"


@ray.remote
class ExpertShardActor:
    """Serves herd.v1.ExpertShard where `listen` says; `dispatch` is the same compute for Ray calls."""

    def __init__(self, path: str, experts: list[int], dtype: str, process_setup: ProcessSetup | None = None,
                 tls: ShardTls | None = None, *, listen: str = "loopback",
                 step_tokens: int = DEFAULT_STEP_TOKENS) -> None:
        check_shard_listen(listen, tls)
        if process_setup is not None:
            process_setup("expert-shard")
        self.host = LOOPBACK if listen == "loopback" else ray.util.get_node_ip_address()
        credentials = tls.server_credentials() if tls is not None else None
        self.server, self.port, self.service = serve_shard(path, experts, host=self.host, dtype=to_dtype(dtype),
                                                           credentials=credentials, step_tokens=step_tokens)

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def max_message_bytes(self) -> int:
        """The largest message this shard takes (and sends): its trunk's channels use the same limit."""
        return self.server.max_message_bytes

    def node_id(self) -> str:
        """The Ray node this shard runs on (a loopback address is good only on this node)."""
        return str(ray.get_runtime_context().get_node_id())

    def experts(self) -> tuple[int, ...]:
        return self.service.shard.experts

    def dispatch(self, layer: int, counts: list[int], rows: torch.Tensor,
                 trace_context: dict[str, str] | None = None) -> torch.Tensor:
        """The rows' expert outputs, checked and traced as over gRPC (ShardExperts.compute)."""
        return self.service.shard.compute(layer, counts, rows, trace_context)

    def stop(self) -> None:
        self.server.stop(grace=1)
