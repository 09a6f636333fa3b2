"""Prefix routing on Ray Serve: with two replicas, each turn of a chat (which resends the whole history) goes to
the replica that served the turn before, so it finds its prefix in that replica's cache; and routing changes no
output (greedy outputs equal those under Serve's power of two choices)."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from herd.model.tiny import make_tiny
from herd.platform.server import app_args
from herd.platform.settings import HerdSettings
from herd.protos.herd.v1 import inference_pb2 as pb

APPS = {"prefix": "routed", "power_of_two": "baseline"}
"""A model (and app) name per router: Serve caches a handle, with its router, per app name in a process."""
BLOCK_TOKENS = 16
CONVERSATIONS, TURNS = 4, 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=43)


def _deploy(path: Path, app: str, request_router: str) -> Any:
    from ray import serve

    from herd.workers.serve_app import build_app

    settings = HerdSettings.load(models=[{"name": app, "path": str(path), "shards": 0, "engine": {"kv_cache_mb": 16},
                                          "deployment": {"num_replicas": 2, "request_router": request_router}}],
                                 tenancy={"auth": False})
    return serve.run(build_app(app_args(settings.models[0], settings)), name=app, route_prefix=None)


async def _generate(stream: Any, ids: list[int], tenant: str) -> tuple[list[int], int]:
    """(output token ids, cached prompt tokens) of one greedy request."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), tenant=pb.TenantContext(tenant_id=tenant),
                                 sampling=pb.SamplingOptions(max_tokens=6, temperature=0, ignore_eos=True))
    out, cached = [], 0
    async for data in stream.generate.remote(request.SerializeToString()):
        chunk = pb.GenerateChunk.FromString(data)
        out.extend(chunk.token_ids)
        if chunk.HasField("usage"):
            cached = chunk.usage.cached_tokens
    return out, cached


async def _conversation(stream: Any, number: int) -> list[tuple[list[int], list[int], int]]:
    """(prompt, output, cached tokens) of each turn: a turn's prompt is the previous prompt, its reply, and a new
    message."""
    rng = random.Random(number)
    turns, prompt = [], [rng.randrange(100, 400) for _ in range(40)]
    for _ in range(TURNS):
        out, cached = await _generate(stream, prompt, tenant=f"tenant-{number % 2}")
        turns.append((prompt, out, cached))
        prompt = prompt + out + [rng.randrange(100, 400) for _ in range(20)]
    return turns


def _chats(request_router: str, tiny: Path) -> list[list[tuple[list[int], list[int], int]]]:
    from ray import serve

    app = APPS[request_router]
    handle = _deploy(tiny, app, request_router)

    async def main() -> list[list[tuple[list[int], list[int], int]]]:
        await handle.model_card.remote()  # the handle's router first, so the streaming handle shares it
        stream = handle.options(stream=True)
        return list(await asyncio.gather(*(_conversation(stream, n) for n in range(CONVERSATIONS))))

    try:
        return asyncio.run(main())
    finally:
        serve.delete(app)


def _sample(name: str) -> float:
    from herd.workers import router_metrics

    value = router_metrics.REGISTRY.get_sample_value(f"herd_router_prefix_{name}_total", {"model": APPS["prefix"]})
    return value or 0.0


def test_each_chat_stays_on_one_replica_and_outputs_do_not_change(ray_session: Any, tiny: Path) -> None:
    hits, misses = _sample("hits"), _sample("misses")
    routed = _chats("prefix", tiny)
    for turns in routed:
        for (previous, _, _), (_, _, cached) in itertools.pairwise(turns):
            # The previous turn's full blocks are in the cache of the replica that served it, and only there.
            assert cached >= len(previous) // BLOCK_TOKENS * BLOCK_TOKENS, [t[2] for t in turns]
    assert _sample("hits") - hits == CONVERSATIONS * (TURNS - 1)  # the router in this process (the handle's)
    assert _sample("misses") - misses == CONVERSATIONS

    baseline = _chats("power_of_two", tiny)
    assert [[(prompt, out) for prompt, out, _ in turns] for turns in routed] == \
        [[(prompt, out) for prompt, out, _ in turns] for turns in baseline]
