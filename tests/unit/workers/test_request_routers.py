"""The Serve request routers, built as Serve builds them (no cluster: replicas are fakes that answer queue-length
probes), asked for ranks directly and through Serve's own routing loop."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata, gRPCRequest
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter

from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers import router_metrics
from herd.workers.prefix_affinity import RouteCounts
from herd.workers.request_routers import PrefixAwareRouter, RoundRobinRouter, generate_request

DEPLOYMENT = DeploymentID(name="routed", app_name="routed")
T = TypeVar("T")


class FakeReplica:
    """What a router reads of Serve's RunningReplica: its id, its capacity, and a queue-length probe."""

    def __init__(self, name: str, queue_len: int = 0, max_ongoing_requests: int = 4) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.queue_len, self.max_ongoing_requests = queue_len, max_ongoing_requests
        self.probes = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes += 1
        return self.queue_len


def build(cls: type[RequestRouter], **kwargs: Any) -> Any:
    router = cls(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN,
                 use_replica_queue_len_cache=True, self_node_id="node", prefer_local_node_routing=False)
    router.initialize_state(**kwargs)
    return router


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(main())  # type: ignore[arg-type]


def generate(ids: list[int], tenant: str = "acme", method: str = "generate", form: str = "bytes",
             request_id: str = "r") -> PendingRequest:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), tenant=pb.TenantContext(tenant_id=tenant))
    arg = {"bytes": request.SerializeToString(), "message": request,
           "proxy": pickle.dumps(gRPCRequest(user_request_proto=request))}[form]
    return PendingRequest(args=[arg], kwargs={}, metadata=RequestMetadata(request_id, request_id, call_method=method))


async def routers_replicas(queues: dict[str, int], **kwargs: Any) -> tuple[Any, dict[str, FakeReplica]]:
    router = build(PrefixAwareRouter, chunk_tokens=4, seed=0, **kwargs)
    replicas = {name: FakeReplica(name, queue) for name, queue in queues.items()}
    router.update_replicas(list(replicas.values()))
    await probed(router, replicas.values())
    for replica in replicas.values():
        router.replica_queue_len_cache.update(replica.replica_id, replica.queue_len)
    return router, replicas


async def probed(router: Any, replicas: Iterable[FakeReplica]) -> None:
    """Until Serve's background probe of new replicas has put each one's queue length in the cache."""
    while not all(router.replica_queue_len_cache.get(replica.replica_id) is not None for replica in replicas):
        await asyncio.sleep(0)


def names(ranks: list[list[FakeReplica]]) -> list[list[str]]:
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


async def route(router: Any, pending: PendingRequest) -> str:
    """Through Serve's own loop (ranks, then the shortest queue of a rank that has room), then the routed hook."""
    replica = await router._choose_replica_for_request(pending)
    router.on_request_routed(pending, replica.replica_id, None)
    return str(replica.replica_id.unique_id)


def test_a_conversation_goes_where_its_first_turn_went() -> None:
    turn1 = list(range(10))
    turn2 = turn1 + [50] * 10
    turn3 = turn2 + [60] * 10

    async def main() -> tuple[list[str], Any]:
        router, replicas = await routers_replicas({"a": 1, "b": 0, "c": 1})
        served = [await route(router, generate(turn1, request_id="1"))]
        router.replica_queue_len_cache.update(replicas["b"].replica_id, 1)  # all alike now
        served.append(await route(router, generate(turn2, request_id="2")))
        served.append(await route(router, generate(turn3, request_id="3", form="proxy", method="Generate")))
        return served, router

    served, router = run(main)
    assert served == ["b", "b", "b"], "the first turn to the least loaded, the next ones after it"
    assert router.affinity.counts == {"tenant:acme": RouteCounts(hits=2, misses=1, matched_chunks=2 + 5)}


def test_another_tenants_same_prompt_is_a_miss() -> None:
    prompt = list(range(16))

    async def main() -> Any:
        router, _ = await routers_replicas({"a": 0, "b": 0})
        await route(router, generate(prompt, tenant="acme", request_id="1"))
        await route(router, generate(prompt, tenant="globex", request_id="2"))
        return router

    counts = run(main).affinity.counts
    assert counts == {"tenant:acme": RouteCounts(misses=1), "tenant:globex": RouteCounts(misses=1)}


def test_the_holder_is_ranked_alone_first_unless_overloaded() -> None:
    prompt = list(range(16))

    async def main() -> tuple[list[list[str]], list[list[str]]]:
        router, replicas = await routers_replicas({"a": 0, "b": 0, "c": 0}, imbalance_requests=2)
        first = generate(prompt, request_id="1")
        await router.choose_replicas(list(replicas.values()), first)
        router.on_request_routed(first, replicas["c"].replica_id, None)
        router.replica_queue_len_cache.update(replicas["c"].replica_id, 2)
        near = names(await router.choose_replicas(list(replicas.values()), generate(prompt, request_id="2")))
        router.replica_queue_len_cache.update(replicas["c"].replica_id, 3)
        router.replica_queue_len_cache.update(replicas["a"].replica_id, 1)
        far = names(await router.choose_replicas(list(replicas.values()), generate(prompt, request_id="3")))
        return near, far

    near, far = run(main)
    assert near[0] == ["c"] and sorted(near[1:]) == [["a"], ["b"]], "2 over the shortest is within 2"
    assert far == [["b"], ["a"], ["c"]], "3 over the shortest is not: least loaded first"


def test_unknown_queues_are_probed_before_ranking() -> None:
    async def main() -> tuple[list[list[str]], dict[str, FakeReplica]]:
        router, replicas = await routers_replicas({"a": 3, "b": 1})
        for replica in replicas.values():
            replica.probes = 0
            router.replica_queue_len_cache.invalidate_key(replica.replica_id)
        return names(await router.choose_replicas(list(replicas.values()), generate(list(range(8))))), replicas

    ranks, replicas = run(main)
    assert ranks == [["b"], ["a"]]
    assert [r.probes for r in replicas.values()] == [1, 1]


def test_calls_that_carry_no_prompt_go_to_every_candidate() -> None:
    async def main() -> list[list[list[str]]]:
        router, replicas = await routers_replicas({"a": 0, "b": 0})
        candidates = list(replicas.values())
        no_args = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata("s", "s", call_method="stats"))
        card = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata("m", "m", call_method="model_card"))
        garbage = PendingRequest(args=[b"\xff\xff"], kwargs={}, metadata=RequestMetadata("g", "g",
                                                                                         call_method="generate"))
        return [names(await router.choose_replicas(candidates, pending)) for pending in (no_args, card, garbage)]

    assert run(main) == [[["a", "b"]]] * 3


def test_gone_replicas_are_forgotten() -> None:
    prompt = list(range(16))

    async def main() -> tuple[Any, Any]:
        router, replicas = await routers_replicas({"a": 0, "b": 0, "c": 0})
        keys = router.affinity.keys(generate_request(generate(prompt).args[0]))
        for name in ("a", "b", "c"):
            router.affinity.record(keys, replicas[name].replica_id)
        router.update_replicas([replicas["a"], replicas["b"]])  # c scaled away
        after_removal = router.affinity.match(keys, [r.replica_id for r in replicas.values()])
        router.on_replica_actor_died(replicas["b"].replica_id)
        after_death = router.affinity.match(keys, [r.replica_id for r in replicas.values()])
        return after_removal, after_death

    after_removal, after_death = run(main)
    assert after_removal[0].unique_id == "b"
    assert after_death[0].unique_id == "a"


def test_routed_requests_are_counted_in_the_routers_registry() -> None:
    def sample(name: str) -> float:
        return router_metrics.REGISTRY.get_sample_value(name, {"model": DEPLOYMENT.name}) or 0.0

    hits, misses, chunks = (sample(f"herd_router_prefix_{n}_total") for n in ("hits", "misses", "matched_chunks"))

    async def main() -> None:
        router, _ = await routers_replicas({"a": 0})
        await route(router, generate(list(range(8)), request_id="1"))
        await route(router, generate(list(range(12)), request_id="2"))

    run(main)
    assert sample("herd_router_prefix_hits_total") == hits + 1
    assert sample("herd_router_prefix_misses_total") == misses + 1
    assert sample("herd_router_prefix_matched_chunks_total") == chunks + 2


def test_generate_request_reads_every_form_a_generate_call_takes() -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), tenant=pb.TenantContext(tenant_id="t"))
    assert generate_request(request) is request
    assert generate_request(request.SerializeToString()) == request
    assert generate_request(pickle.dumps(gRPCRequest(user_request_proto=request))) == request
    assert generate_request(pickle.dumps({"user_request_proto": "x"})) is None
    assert generate_request(b"\x80not a pickle") is None
    assert generate_request(b"\xff\xff") is None
    assert generate_request("text") is None


def test_round_robin_takes_turns_and_passes_over_full_queues() -> None:
    async def main() -> list[list[str]]:
        router = build(RoundRobinRouter, imbalance_requests=8)
        replicas = [FakeReplica(name) for name in "abc"]
        router.update_replicas(replicas)
        await probed(router, replicas)
        for replica, queue in zip(replicas, (0, 4, 1), strict=True):  # b is full
            router.replica_queue_len_cache.update(replica.replica_id, queue)
        return [[rank[0] for rank in names(await router.choose_replicas(replicas))] for _ in range(3)]

    assert run(main) == [["a", "c", "b"], ["c", "a", "b"], ["c", "a", "b"]]


@pytest.mark.parametrize("cls", [PrefixAwareRouter, RoundRobinRouter])
def test_serve_backs_off_after_the_ranks_are_tried(cls: type[RequestRouter]) -> None:
    async def main() -> bool:
        router = build(cls)
        replicas = [FakeReplica("a")]
        router.update_replicas(replicas)
        pending = generate(list(range(20)))
        await router.choose_replicas(replicas, pending)
        return bool(pending.routing_context.should_backoff)

    assert run(main), "else Serve's loop retries at once, forever, while every replica is full"
