"""Prefix affinity: keys salted like the engine's cache, the longest prefix's replica, and the pure ranking."""

from __future__ import annotations

import random

import pytest

from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.prefix_affinity import PrefixAffinity, ReplicaLoad, RouteCounts, cache_salt, least_loaded, rank

A, B, C = "replica-a", "replica-b", "replica-c"


def request(ids: list[int], tenant: str = "acme", group: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                              tenant=pb.TenantContext(tenant_id=tenant, sharing_group=group))


def route(affinity: PrefixAffinity[str], req: pb.GenerateRequest, replicas: list[str],
          fallback: str) -> str:
    """What the router does: the matched replica, else `fallback` (standing in for the least loaded); counted and
    recorded where it went."""
    keys = affinity.keys(req)
    matched, _ = affinity.match(keys, replicas)
    chosen = matched if matched is not None else fallback
    affinity.count(cache_salt(req.tenant), affinity.match(keys, [chosen])[1])
    affinity.record(keys, chosen)
    return chosen


def test_keys_are_a_chain_over_full_chunks() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(chunk_tokens=4)
    keys = affinity.keys(request(list(range(10))))
    assert len(keys) == 2  # the last 2 tokens are no full chunk
    longer = affinity.keys(request([*range(8), 99, 98, 97, 96]))
    assert len(longer) == 3 and longer[:2] == keys, "a longer prompt extends the chain"
    changed_first = affinity.keys(request([7, *range(1, 10)]))
    assert not set(changed_first) & set(keys), "a change in chunk 0 changes every later key"
    assert affinity.keys(request([1, 2, 3])) == []


def test_text_prompts_chunk_characters_apart_from_token_prompts() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(chunk_chars=8)
    text = pb.GenerateRequest(text="x" * 20, tenant=pb.TenantContext(tenant_id="acme"))
    keys = affinity.keys(text)
    assert len(keys) == 2
    longer = pb.GenerateRequest(text="x" * 24 + "yy", tenant=pb.TenantContext(tenant_id="acme"))
    assert affinity.keys(longer)[:2] == keys


def test_the_salt_is_the_engines() -> None:
    assert cache_salt(pb.TenantContext(tenant_id="acme")) == "tenant:acme"
    assert cache_salt(pb.TenantContext(tenant_id="acme", sharing_group="team")) == "group:team"
    assert cache_salt(pb.TenantContext()) == "tenant:default"


def test_the_longest_prefix_wins_among_live_replicas() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(chunk_tokens=4)
    short, long = affinity.keys(request(list(range(8)))), affinity.keys(request(list(range(16))))
    affinity.record(short, A)
    affinity.record(long, B)  # B was sent the same first 8 tokens, and more
    query = affinity.keys(request([*range(12), 50, 51, 52, 53]))
    assert affinity.match(query, [A, B, C]) == (B, 3)
    assert affinity.match(query, [A, C]) == (A, 2), "a replica not among the candidates is passed over"
    assert affinity.match(affinity.keys(request([9] * 8)), [A, B]) == (None, 0)


def test_a_conversation_follows_its_first_turn_and_counts_hits_per_salt() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(chunk_tokens=4)
    turn1 = list(range(100, 110))
    turn2 = [*turn1, 7, 7, 7, 7, 8, 8]  # the history resent, and the reply and the next message after it
    turn3 = turn2 + [9] * 12
    assert route(affinity, request(turn1), [A, B, C], fallback=B) == B
    assert route(affinity, request(turn2), [A, B, C], fallback=A) == B
    assert route(affinity, request(turn3), [A, B, C], fallback=C) == B
    assert affinity.counts == {"tenant:acme": RouteCounts(hits=2, misses=1, matched_chunks=2 + 4)}


def test_isolation_another_tenants_same_prompt_never_matches() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(chunk_tokens=4)
    prompt = list(range(32))
    route(affinity, request(prompt, tenant="acme"), [A, B], fallback=A)
    assert route(affinity, request(prompt, tenant="globex"), [A, B], fallback=B) == B
    assert route(affinity, request(prompt, tenant="initech"), [A, B], fallback=A) == A
    assert affinity.counts["tenant:globex"] == RouteCounts(misses=1)
    assert affinity.counts["tenant:initech"] == RouteCounts(misses=1), "landing on acme's replica is no hit"
    assert not set(affinity.keys(request(prompt, tenant="acme"))) & set(affinity.keys(request(prompt, "globex")))


def test_a_sharing_group_shares() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(chunk_tokens=4)
    prompt = list(range(32))
    route(affinity, request(prompt, tenant="acme", group="team"), [A, B], fallback=A)
    assert route(affinity, request(prompt, tenant="globex", group="team"), [A, B], fallback=B) == A
    assert affinity.counts == {"group:team": RouteCounts(hits=1, misses=1, matched_chunks=8)}
    assert route(affinity, request(prompt, tenant="globex"), [A, B], fallback=B) == B, "outside the group: own salt"


def test_the_table_is_bounded_and_drops_the_deepest_chunks_of_the_oldest_first() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(chunk_tokens=2, max_entries=6)
    old, new = affinity.keys(request(list(range(8)))), affinity.keys(request(list(range(50, 58))))
    affinity.record(old, A)
    affinity.record(new, B)
    assert len(affinity) == 6
    assert affinity.match(new, [A, B]) == (B, 4)
    assert affinity.match(old, [A, B]) == (A, 2), "the oldest request's first two chunks are still known"
    affinity.record(affinity.keys(request(list(range(90, 94)))), C)
    assert affinity.match(old, [A, B, C]) == (None, 0)


def test_a_replica_sent_a_prefix_again_becomes_its_latest_holder() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(chunk_tokens=4)
    keys = affinity.keys(request(list(range(8))))
    affinity.record(keys, A)
    affinity.record(keys, B)
    assert affinity.match(keys, [A, B]) == (B, 2)
    affinity.record(keys, A)
    assert affinity.match(keys, [A, B]) == (A, 2)
    assert len(affinity) == 2


def test_forget_drops_a_replica_and_keeps_the_others() -> None:
    affinity: PrefixAffinity[str] = PrefixAffinity(chunk_tokens=4)
    shared, own = affinity.keys(request(list(range(8)))), affinity.keys(request(list(range(40, 48))))
    affinity.record(shared, A)
    affinity.record(shared, B)
    affinity.record(own, B)
    affinity.forget(B)
    assert affinity.match(shared, [A, B]) == (A, 2)
    assert affinity.match(own, [A, B]) == (None, 0)
    assert len(affinity) == 2


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1, got 0"):
        PrefixAffinity(chunk_tokens=0)


def loads(**queues: int | None) -> list[ReplicaLoad[str]]:
    return [ReplicaLoad(name, queue, 4) for name, queue in queues.items()]


def test_rank_puts_the_holder_first_within_the_imbalance() -> None:
    rng = random.Random(0)
    assert rank(loads(a=1, b=3, c=0), "b", 3, rng)[0] == "b"
    assert rank(loads(a=1, b=3, c=0), "b", 3, rng)[1:] == ["c", "a"]


@pytest.mark.parametrize(("queues", "reason"), [
    ({"a": 1, "b": 3, "c": 0}, "3 more than the shortest is over an imbalance of 2"),
    ({"a": 1, "b": 4, "c": 2}, "b's queue is full"),
    ({"a": 1, "b": None, "c": 2}, "b's queue is unknown"),
])
def test_rank_falls_back_to_least_loaded_when_the_holder_is_overloaded(queues: dict[str, int | None],
                                                                        reason: str) -> None:
    order = rank(loads(**queues), "b", 2, random.Random(0))
    assert order[0] != "b", reason
    assert order == least_loaded(loads(**queues), random.Random(0))
    assert order[-1] == "b"


def test_no_match_is_least_loaded_with_ties_in_a_random_order() -> None:
    assert rank(loads(a=2, b=0, c=1, d=None), None, 8, random.Random(0)) == ["b", "c", "a", "d"]
    firsts = {rank(loads(a=0, b=0, c=0), None, 8, random.Random(seed))[0] for seed in range(20)}
    assert firsts == {"a", "b", "c"}, "idle replicas share new conversations"
    assert rank(loads(a=4, b=3), "gone", 8, random.Random(0)) == ["b", "a"], "a full queue goes last"
