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


def _serve(tiny: Path, engine: dict[str, Any], prompts: list[list[int]],
           max_tokens: int) -> tuple[list[list[int]], dict[str, int]]:
    """A replica of 2 trunks and 2 shard actors with these engine settings: each prompt's greedy tokens, streamed at
    once, and the replica's stats after."""
    from ray import serve

    from herd.workers.serve_app import build_app

    settings = HerdSettings.load(models=[{
        "name": APP, "path": str(tiny), "shards": 2, "trunks": 2, "transport": "collective", "shard_restarts": 0,
        "engine": engine, "deployment": {"num_replicas": 1}}], tenancy={"auth": False})
    handle = serve.run(build_app(app_args(settings.models[0], settings)), name=APP, route_prefix=None)

    async def main() -> tuple[list[list[int]], dict[str, int]]:
        await handle.model_card.remote()
        stream = handle.options(stream=True)
        outputs = list(await asyncio.gather(*(_generate(stream, p, max_tokens) for p in prompts)))
        return outputs, await handle.stats.remote()

    try:
        return asyncio.run(main())
    finally:
        serve.delete(APP)


async def _generate(stream: Any, ids: list[int], max_tokens: int) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), tenant=pb.TenantContext(tenant_id="t"),
                                 sampling=pb.SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    out: list[int] = []
    async for data in stream.generate.remote(request.SerializeToString()):
        out.extend(pb.GenerateChunk.FromString(data).token_ids)
    return out


def test_a_replica_of_two_trunks_serves_the_single_process_tokens(ray_session: Any, tiny: Path) -> None:
    prompts = _prompts()
    got, stats = _serve(tiny, {"kv_cache_mb": KV_MB, "micro_batches": 2}, prompts, 8)
    alone = LLMEngine(load_model(tiny, progress=False), Tokenizer.from_pretrained(tiny),
                      EngineConfig(kv_cache_mb=KV_MB))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert got == [o.token_ids for o in alone.generate(prompts, greedy)]
    one = alone.stats().kv_blocks
    assert {g: stats[f"kv_blocks_total_{g}"] for g in one} == {g: 2 * n for g, n in one.items()}  # both trunks' KV
    assert stats["kv_blocks_held"] == 0


def test_a_replica_of_two_trunks_serves_a_sequence_longer_than_one_trunks_kv(ray_session: Any, tiny: Path) -> None:
    """Context parallelism served: each trunk's cache holds 8 global blocks (128 tokens), the prompt and its tokens
    200; the replica serves it (global KV on both trunks), with the single-process tokens."""
    small = {"kv_cache_mb": 212992 / 2**20, "max_num_seqs": 2, "max_num_batched_tokens": 32, "max_model_len": 224}
    prompt = torch.randint(5, 400, (180,), generator=torch.Generator().manual_seed(7)).tolist()
    (got,), stats = _serve(tiny, {**small, "context_parallel": 2}, [prompt], 20)
    alone = LLMEngine(load_model(tiny, progress=False), Tokenizer.from_pretrained(tiny),
                      EngineConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=224))
    assert got == alone.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].token_ids
    assert stats["kv_blocks_total_full"] == 16 and stats["kv_blocks_held"] == 0


def test_context_parallelism_spans_every_trunk_or_none(tiny: Path) -> None:
    with pytest.raises(ValueError, match=r"engine\.context_parallel is 3"):
        ReplicaArgs.model_validate({"name": "m", "path": str(tiny), "shards": 2, "trunks": 2,
                                    "transport": "collective", "engine": {"context_parallel": 3}})


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
