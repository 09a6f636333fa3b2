"""An expert shard as a Ray actor inside its replica's placement group: a gRPC server, Ray-callable too, and a
rank of its replica's collective group once told to join one.

It listens on loopback (`listen="loopback"`: the trunk is on the same node, its placement group being
STRICT_PACK), or on its node's address with mutual TLS (`listen="node"`, for shards spread over nodes). The gRPC
server stays up with the collective too: it answers health checks and Info, the control path. `device` is where its
experts live and compute (the trunk's device: "cuda" on a GPU bundle, whose one GPU Ray makes cuda:0).

Restarted in place (herd.workers.shard_recovery): the replica keeps a `watch` call pending on every shard (it
returns only by the actor dying, on a thread of its own); Ray starts a dead shard again with the same arguments,
and a collective shard joins its trunk's next group, the survivors too, each with the experts it is told to hold.
"""

from __future__ import annotations

import threading

import ray
import torch

from herd.model.config import load_config
from herd.model.dtypes import to_dtype
from herd.workers.collective import CollectiveGroup, Rendezvous
from herd.workers.collective_shard import CollectiveShard
from herd.workers.expert_shard import DEFAULT_STEP_TOKENS
from herd.workers.expert_shard import serve as serve_shard
from herd.workers.process_setup import ProcessSetup
from herd.workers.shard_experts import AdapterAction, ShardExperts
from herd.workers.shard_tls import ShardTls, check_shard_listen

LOOPBACK = "127.0.0.1"
LEAVE_TIMEOUT_S = 30.0
"""How long joining a new collective group waits for this shard's last one to end (its trunk told it to stop)."""


@ray.remote(concurrency_groups={"watch": 1})  # type: ignore[call-overload]  # Ray's stub lacks the option
class ExpertShardActor:
    """Serves herd.v1.ExpertShard where `listen` says; `dispatch` is the same compute for Ray calls."""

    def __init__(self, path: str, experts: list[int], dtype: str, process_setup: ProcessSetup | None = None,
                 tls: ShardTls | None = None, *, listen: str = "loopback",
                 step_tokens: int = DEFAULT_STEP_TOKENS, device: str = "cpu") -> None:
        check_shard_listen(listen, tls)
        if process_setup is not None:
            process_setup("expert-shard")
        self.host = LOOPBACK if listen == "loopback" else ray.util.get_node_ip_address()
        credentials = tls.server_credentials() if tls is not None else None
        self.server, self.port, self.service = serve_shard(path, experts, host=self.host, dtype=to_dtype(dtype),
                                                           device=device, credentials=credentials,
                                                           step_tokens=step_tokens)
        self.path, self.device, self.dtype = path, device, to_dtype(dtype)
        self.collective: CollectiveShard | None = None
        self._collective_thread: threading.Thread | None = None

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def max_message_bytes(self) -> int:
        """The largest message this shard takes (and sends): its trunk's channels use the same limit."""
        return self.server.max_message_bytes

    def node_id(self) -> str:
        """The Ray node this shard runs on (a loopback address is good only on this node)."""
        return str(ray.get_runtime_context().get_node_id())

    def experts(self) -> tuple[int, ...]:
        """What it holds now (a collective re-placement may have changed it)."""
        return self.collective.experts if self.collective is not None else self.service.shard.experts

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        """Never returns: the replica's pending call on it fails when this actor's process dies."""
        threading.Event().wait()

    def join_collective(self, rendezvous: Rendezvous, rank: int, experts: list[int] | None = None, *,
                        trunks: int = 1) -> None:
        """Join the trunk's group as `rank` and serve it on a thread of its own (returns at once: joining waits for
        every rank, the trunk included, and this actor keeps answering health checks meanwhile). A shard of a group
        that ended (its trunk re-forms the group around a restarted shard) joins the next with what it holds, or
        with `experts` loaded again where it holds others (a restarted shard after a re-placement). `trunks`: the
        group's trunks (ranks 0..trunks - 1), which dispatch in lockstep (M:N)."""
        if self._collective_thread is not None:
            self._collective_thread.join(timeout=LEAVE_TIMEOUT_S)
            if self._collective_thread.is_alive():
                raise RuntimeError("this shard still serves its last collective group")
        num_experts = load_config(self.path).text.num_local_experts
        shard = self.collective.shard if self.collective is not None else self.service.shard
        if experts is not None and tuple(experts) != shard.experts:
            shard = ShardExperts.load(self.path, tuple(experts), dtype=self.dtype, device=self.device)

        def serve() -> None:
            group = CollectiveGroup(rendezvous, rank, device=self.device)
            self.collective = CollectiveShard(shard, group, num_experts, trunks=trunks)
            self.collective.serve()

        self._collective_thread = threading.Thread(target=serve, name=f"collective-rank-{rank}", daemon=True)
        self._collective_thread.start()

    def serving(self) -> bool:
        """Whether it can serve its trunk: always over gRPC or Ray calls; with a collective group, while its
        thread runs (joining or answering)."""
        return self._collective_thread is None or self._collective_thread.is_alive()

    def dispatch(self, layer: int, counts: list[int], rows: torch.Tensor,
                 trace_context: dict[str, str] | None = None, row_slots: torch.Tensor | None = None) -> torch.Tensor:
        """The rows' expert outputs, checked and traced as over gRPC (ShardExperts.compute)."""
        return self.service.shard.compute(layer, counts, rows, trace_context, row_slots)

    def set_adapter(self, action: AdapterAction, slot: int, path: str, slots: int, max_rank: int) -> None:
        """Load the LoRA adapter at `path` into bank slot `slot`, empty the slot, or check the adapter fits
        (ShardExperts.set_adapter)."""
        self.service.shard.set_adapter(action, slot, path, slots=slots, max_rank=max_rank)

    def stop(self) -> None:
        self.server.stop(grace=1)
