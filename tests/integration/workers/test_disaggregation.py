"""Prefill/decode disaggregation on Ray Serve (issue 25): the tiny Scout served colocated and disaggregated (one
prefill and one decode replica behind the proxy), reached through the gateway's Serve backend as a gateway reaches a
model. Every request's chunks are the colocated app's, greedy and seeded alike; the decode replica imported the
prompts' blocks from Ray's object store and found them as prefix hits; no KV block stays held."""

from __future__ import annotations

import asyncio

from herd.model.tiny import make_tiny
from herd.platform.server import app_args
from herd.platform.settings import HerdSettings
from herd.protos.herd.v1 import inference_pb2 as pb

ENGINE = {"block_size": 8, "max_num_seqs": 8, "kv_cache_mb": 8, "max_model_len": 512}
PROMPTS = [list(range(3, 3 + n)) for n in (9, 40, 77)] + [[5, 9, 11, 200, 17] * 12]


def _requests() -> list[pb.GenerateRequest]:
    greedy = pb.SamplingOptions(max_tokens=16, temperature=0, ignore_eos=True)
    seeded = pb.SamplingOptions(max_tokens=16, temperature=0.9, seed=25, ignore_eos=True)
    return [pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling, request_id=f"r{i}-{j}",
                               tenant=pb.TenantContext(tenant_id="t", weight=1))
            for i, ids in enumerate(PROMPTS) for j, sampling in enumerate((greedy, seeded))]


async def _serve(app: str) -> tuple[list[tuple[list[int], str, int, int]], dict[str, int]]:
    from herd.platform.gateway.serve_backend import ServeBackend

    backend = await ServeBackend.connect(app)

    async def one(request: pb.GenerateRequest) -> tuple[list[int], str, int, int]:
        tokens, text, usage = [], [], pb.Usage()
        async for chunk in backend.generate(request):
            tokens += chunk.token_ids
            text.append(chunk.text)
            usage = chunk.usage if chunk.HasField("usage") else usage
        return tokens, "".join(text), usage.prompt_tokens, usage.completion_tokens

    replies = await asyncio.gather(*(one(r) for r in _requests()))
    return replies, await backend.stats()


def test_disaggregated_outputs_are_the_colocated_ones(ray_session, tmp_path):
    from ray import serve

    from herd.workers.serve_app import build_app

    path = make_tiny(tmp_path / "scout", preset="scout", seed=25)
    models = [{"name": name, "path": str(path), "shards": 0, "engine": ENGINE, "stream_interval_s": 0, **extra}
              for name, extra in (("colocated", {}), ("split", {"disaggregation": {"prefill_replicas": 1,
                                                                                    "decode_replicas": 1}}))]
    settings = HerdSettings.load(models=models, tenancy={"auth": False})
    try:
        for model in settings.models:
            serve.run(build_app(app_args(model, settings)), name=model.name, route_prefix=None)
        colocated, _ = asyncio.run(_serve("colocated"))
        split, stats = asyncio.run(_serve("split"))
    finally:
        for model in settings.models:
            serve.delete(model.name)
    assert split == colocated, "tokens, text and usage as the colocated replica's"
    assert all(len(tokens) == 16 for tokens, *_ in split)
    blocks = sum((len(ids) - 1) // 8 for ids in PROMPTS) * 2
    assert stats["pd_requests"] == stats["pd_prefilled"] == len(split) and stats["pd_fallbacks"] == 0
    assert stats["kv_imports"] == len(split) and stats["kv_import_failures"] == 0
    assert stats["pd_blocks_moved"] == blocks and stats["kv_imported_bytes"] == stats["pd_bytes_moved"] > 0
    assert stats["kv_imported_blocks"] > 0, "the decode replica wrote the imported blocks"
    assert stats["prefix_hit_tokens"] == blocks * 8, "and every request found its prompt's blocks there"
    assert stats["prefill_kv_prefills"] == len(split)
    assert stats["kv_blocks_held"] == 0 == stats["prefill_kv_blocks_held"]
