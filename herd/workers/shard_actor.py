"""An expert shard as a Ray actor inside its replica's placement group: a gRPC server, and Ray-callable too."""

from __future__ import annotations

import ray
import torch

from herd.model.dtypes import to_dtype
from herd.workers.expert_shard import serve as serve_shard
from herd.workers.process_setup import ProcessSetup
from herd.workers.shard_tls import ShardTls


@ray.remote
class ExpertShardActor:
    """Serves herd.v1.ExpertShard on its node's address; `dispatch` is the same compute for Ray calls."""

    def __init__(self, path: str, experts: list[int], dtype: str, process_setup: ProcessSetup | None = None,
                 tls: ShardTls | None = None) -> None:
        if process_setup is not None:
            process_setup("expert-shard")
        self.host = ray.util.get_node_ip_address()
        credentials = tls.server_credentials() if tls is not None else None
        self.server, self.port, self.service = serve_shard(path, experts, host=self.host, dtype=to_dtype(dtype),
                                                           credentials=credentials)

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def experts(self) -> tuple[int, ...]:
        return self.service.shard.experts

    def dispatch(self, layer: int, counts: list[int], rows: torch.Tensor,
                 trace_context: dict[str, str] | None = None) -> torch.Tensor:
        """The rows' expert outputs, checked and traced as over gRPC (ShardExperts.compute)."""
        return self.service.shard.compute(layer, counts, rows, trace_context)

    def stop(self) -> None:
        self.server.stop(grace=1)
