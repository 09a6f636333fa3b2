"""A Serve replica of 2 trunks and 2 expert shard actors (issue 28's M:N on Ray): the replica's placement group, its
trunks stepping in lockstep over one collective group, concurrent streams spread over both trunks with the
single-process engine's tokens, and both trunks' KV in the replica's stats."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.model import load_model
from herd.model.tiny import make_tiny
from herd.model.tokenizer import Tokenizer
from herd.platform.server import app_args
from herd.platform.settings import HerdSettings
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.replica_config import ReplicaArgs

APP = "trunks"
KV_MB = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=21)


def _prompts() -> list[list[int]]:
    return [torch.randint(5, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in (6, 33, 14, 25, 9, 18)]


async def _generate(stream: Any, ids: list[int]) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), tenant=pb.TenantContext(tenant_id="t"),
                                 sampling=pb.SamplingOptions(max_tokens=8, temperature=0, ignore_eos=True))
    out: list[int] = []
    async for data in stream.generate.remote(request.SerializeToString()):
        out.extend(pb.GenerateChunk.FromString(data).token_ids)
    return out


def test_a_replica_of_two_trunks_serves_the_single_process_tokens(ray_session: Any, tiny: Path) -> None:
    from ray import serve

    from herd.workers.serve_app import build_app

    settings = HerdSettings.load(models=[{
        "name": APP, "path": str(tiny), "shards": 2, "trunks": 2, "transport": "collective", "shard_restarts": 0,
        "engine": {"kv_cache_mb": KV_MB, "micro_batches": 2}, "deployment": {"num_replicas": 1}}],
        tenancy={"auth": False})
    handle = serve.run(build_app(app_args(settings.models[0], settings)), name=APP, route_prefix=None)
    prompts = _prompts()

    async def main() -> tuple[list[list[int]], dict[str, int]]:
        await handle.model_card.remote()
        stream = handle.options(stream=True)
        outputs = list(await asyncio.gather(*(_generate(stream, p) for p in prompts)))
        return outputs, await handle.stats.remote()

    try:
        got, stats = asyncio.run(main())
    finally:
        serve.delete(APP)
    alone = LLMEngine(load_model(tiny, progress=False), Tokenizer.from_pretrained(tiny),
                      EngineConfig(kv_cache_mb=KV_MB))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert got == [o.token_ids for o in alone.generate(prompts, greedy)]
    one = alone.stats().kv_blocks
    assert {g: stats[f"kv_blocks_total_{g}"] for g in one} == {g: 2 * n for g, n in one.items()}  # both trunks' KV
    assert stats["kv_blocks_held"] == 0


@pytest.mark.parametrize(("extra", "words"), [
    ({"transport": "grpc"}, "collective transport"),
    ({"shards": 0}, "collective transport"),
    ({"transport": "collective", "balance": {"enabled": True}}, "balance.enabled"),
    ({"transport": "collective", "engine": {"max_loras": 2}}, "engine.max_loras"),
])
def test_what_several_trunks_cannot_run_with_is_refused_before_anything_starts(tiny: Path, extra, words) -> None:
    with pytest.raises(ValueError, match="trunks > 1") as caught:
        ReplicaArgs.model_validate({"name": "m", "path": str(tiny), "shards": 2, "trunks": 2, **extra})
    assert words in str(caught.value)
