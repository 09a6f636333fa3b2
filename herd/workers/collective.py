"""A replica's collective group: its trunk(s) and its expert shards as one torch.distributed group.

Legend: W world size (M trunks + N shards), M trunks (1 unless issue 28's M:N layout), N shards.

Ranks: the trunks are ranks 0..M-1 (one, rank 0, unless M:N), the shards ranks M..M+N-1 (shard index = rank - M).
Trunk 0 opens the store and speaks for the replica to the shards (control messages); every trunk dispatches rows.

The group is stateless in torch's sense: a process group built straight from a TCP store, not torch's default group,
so one process may hold several (tests, benchmarks) and none leaks into another's. Gloo on CPU, NCCL on CUDA, chosen
by the trunks' device and the same for every rank. Trunk 0 opens the store (a free port on its node) and hands the
`Rendezvous` to the shards however it reaches them (Ray actor calls in a replica, command-line flags for processes).

Rows travel point to point (`send`, `recv`: each trunk and each shard; shards never send to each other in a step,
nor trunks to trunks), which on gloo costs a fifth of an all_to_all_single over the whole group (every rank pairs
with every other in one, shards included, with nothing to say: 0.6 ms against 0.14 ms median on the 2-core machine,
a tail of 4 ms against 0.3); NCCL runs an all_to_all as the same grouped sends and receives. `all_to_all` stays for
what does go shard to shard (moving experts). Every operation is asynchronous (torch's Work) and every wait has a
timeout: a rank that died breaks the group at once on gloo (its TCP pairs close) and a hung one after the timeout.
Either way the group is then unusable (`CollectiveError`, `broken`): a replica reports unhealthy and is restarted,
as a replica whose gRPC shard died is. Tensors travel as bytes (a dtype-agnostic uint8 view), so bfloat16, FP8 and
int4 storage move alike.
"""

from __future__ import annotations

import datetime
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, Store, TCPStore, Work

Backend = Literal["gloo", "nccl"]
STORE_PREFIX = "herd-experts"
IDLE_TIMEOUT_S = 30 * 24 * 3600.0
"""How long a shard waits for its trunk's next message: an idle replica sends nothing, for as long as it is idle."""


class _Backend(Protocol):
    """What this module calls of gloo's and NCCL's process groups (torch's stub types them on ProcessGroup)."""

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Work: ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Work: ...

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                      input_split_sizes: list[int], opts: dist.AllToAllOptions) -> Work: ...


class CollectiveError(RuntimeError):
    """A collective failed: a peer died (`timed_out` False) or did not take part in time (`timed_out` True)."""

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the ranks of one replica meet (picklable: it travels to the shards)."""

    host: str  # the trunk's node address (loopback when every rank is on one node)
    port: int  # the trunk's TCP store
    world_size: int
    backend: Backend
    timeout_s: float  # joining, and every collective of the trunk


def backend_for(device: torch.device | str) -> Backend:
    """NCCL for CUDA tensors, gloo for the CPU's."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def open_rendezvous(host: str, world_size: int, *, backend: Backend, timeout_s: float,
                    ) -> tuple[TCPStore, Rendezvous]:
    """The trunk's store on a free port of `host`, and only there (TCPStore binds every interface when it binds
    for itself: it is handed a socket bound here instead). The caller keeps the store until the group is built."""
    if world_size < 2:
        raise ValueError(f"a collective group needs the trunk and at least one shard, got world size {world_size}")
    listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=world_size * 4)
    port = listener.getsockname()[1]
    store = TCPStore(host, port, world_size, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                     master_listen_fd=listener.detach(), use_libuv=True)  # the store owns the socket from here
    return store, Rendezvous(host=host, port=port, world_size=world_size, backend=backend, timeout_s=timeout_s)


class CollectiveGroup:
    """One rank's membership of a replica's group: joins on construction (blocking until every rank has)."""

    def __init__(self, rendezvous: Rendezvous, rank: int, *, device: torch.device | str = "cpu",
                 store: Store | None = None) -> None:
        if not 0 <= rank < rendezvous.world_size:
            raise ValueError(f"rank {rank} is outside a world of {rendezvous.world_size}")
        self.rendezvous, self.rank, self.device = rendezvous, rank, torch.device(device)
        self.world_size = rendezvous.world_size
        self.broken: str | None = None  # why the group cannot be used any more
        timeout = datetime.timedelta(seconds=rendezvous.timeout_s)
        if store is None:
            store = TCPStore(rendezvous.host, rendezvous.port, rendezvous.world_size, False, timeout)
        self._store = PrefixStore(STORE_PREFIX, store)
        self._pg = _process_group(self._store, rank, rendezvous, timeout)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: list[int],
                   input_splits: list[int], *, timeout_s: float | None = None) -> Work:
        """Start an all_to_all_single of bytes: rank r sends input_splits[r] rows of `input` to each rank and
        takes output_splits[r] rows from each into `output`. Rows are the leading dimension; any dtype."""
        options = dist.AllToAllOptions()
        options.timeout = datetime.timedelta(seconds=timeout_s or self.rendezvous.timeout_s)
        return self._started(lambda: self._pg.alltoall_base(_bytes(output), _bytes(input), output_splits,
                                                            input_splits, options))

    def send(self, tensor: torch.Tensor, to: int, tag: int) -> Work:
        """Start sending a contiguous tensor's bytes to rank `to` (done once `to` has posted the matching recv)."""
        return self._started(lambda: self._pg.send([_bytes(tensor).reshape(-1)], to, tag))

    def send_anyway(self, tensor: torch.Tensor, to: int, tag: int) -> Work:
        """send, on a group already broken by another rank (its pairs to the live ranks still work on gloo: the
        trunk's last word to the surviving shards); RuntimeError if this rank closed the group."""
        if self._pg is None:
            raise RuntimeError("this rank closed its collective group")
        return self._pg.send([_bytes(tensor).reshape(-1)], to, tag)

    def recv(self, tensor: torch.Tensor, source: int, tag: int) -> Work:
        """Start receiving rank `source`'s bytes into a contiguous tensor of their size."""
        return self._started(lambda: self._pg.recv([_bytes(tensor).reshape(-1)], source, tag))

    def wait(self, work: Work, *, timeout_s: float | None = None) -> None:
        """Wait for an operation this rank started (keep its Work until then); CollectiveError (and the group
        broken) if it failed: a peer gone at once, one that does not take part within the timeout."""
        try:
            work.wait(datetime.timedelta(seconds=timeout_s or self.rendezvous.timeout_s))
        except RuntimeError as err:
            raise self._fail(err) from err

    def exchange(self, output: torch.Tensor, input: torch.Tensor, output_splits: list[int], input_splits: list[int],
                 *, timeout_s: float | None = None) -> None:
        """all_to_all and wait for it."""
        self.wait(self.all_to_all(output, input, output_splits, input_splits, timeout_s=timeout_s),
                  timeout_s=timeout_s)

    def close(self) -> None:
        """Drop this rank's connections (peers blocked on it fail at once on gloo); the group is broken after."""
        self.broken = self.broken or "closed"
        abort = getattr(self._pg, "abort", None)
        if callable(abort):
            abort()
        self._pg = None  # type: ignore[assignment]  # closing the pairs is the backend's destructor's job

    def _started(self, start: Callable[[], Work]) -> Work:
        """An operation started on a usable group; CollectiveError (and the group broken) if starting failed."""
        if self.broken is not None:
            raise CollectiveError(f"the replica's collective group is unusable: {self.broken}", timed_out=False)
        try:
            return start()
        except RuntimeError as err:
            raise self._fail(err) from err

    def _fail(self, err: RuntimeError) -> CollectiveError:
        text = str(err)
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        self.broken = text.splitlines()[0] if text else type(err).__name__
        return CollectiveError(self.broken, timed_out=timed_out)


def _process_group(store: Store, rank: int, rendezvous: Rendezvous, timeout: datetime.timedelta,
                   ) -> _Backend:
    if rendezvous.backend == "gloo":
        options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # the stub's Options differs at runtime
        options._timeout = timeout
        options._devices = [ProcessGroupGloo.create_device(hostname=rendezvous.host)]
        return cast(_Backend, ProcessGroupGloo(store, rank, rendezvous.world_size, options))
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None or not torch.cuda.is_available():
        raise RuntimeError("the nccl backend needs a CUDA build of torch and a GPU")
    options = nccl.Options()
    options._timeout = timeout
    return cast(_Backend, nccl(store, rank, rendezvous.world_size, options))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as uint8 with the same leading dimension: [R, ...] -> [R, bytes per row]
    (a view: what arrives in it lands in the tensor)."""
    if not tensor.is_contiguous():
        raise ValueError("collective buffers must be contiguous (received rows land in them in place)")
    per_row = math.prod(tensor.shape[1:])
    return tensor.reshape(tensor.shape[0], per_row).view(torch.uint8)
