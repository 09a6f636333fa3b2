"""Prefill on one replica core, decode on another (herd.workers.kv_handoff over the in-process KV transport): the
decode side's chunks are a colocated core's, its prompt came as imported blocks, and an export it cannot take only
costs it the prompt's compute."""

from __future__ import annotations

import asyncio

import pytest

from herd.engine import EngineConfig
from herd.model.tiny import make_tiny
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.kv_handoff import KVHandoff
from herd.workers.kv_transport import InProcessKVTransport, Prefilled
from herd.workers.replica_config import ReplicaConfig
from herd.workers.replica_core import ReplicaCore

ENGINE = EngineConfig(block_size=8, max_model_len=256, max_num_seqs=4, kv_cache_mb=4)
PROMPTS = [list(range(3, 60)), list(range(100, 141))]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ReplicaConfig:
    path = make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=5)
    return ReplicaConfig(name="scout", path=str(path), shards=0, engine=ENGINE, stream_interval_s=0)


def _request(ids: list[int], rid: str) -> pb.GenerateRequest:
    sampling = pb.SamplingOptions(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=sampling, request_id=rid,
                              tenant=pb.TenantContext(tenant_id="t"))


async def _tokens(chunks) -> tuple[list[int], int]:
    tokens, cached = [], -1
    async for chunk in chunks:
        tokens += chunk.token_ids
        cached = chunk.usage.cached_tokens if chunk.HasField("usage") else cached
    return tokens, cached


def test_decode_after_prefill_gives_the_colocated_chunks(config):
    transport = InProcessKVTransport()
    prefill, decode = KVHandoff(ReplicaCore(config), transport), KVHandoff(ReplicaCore(config), transport)
    colocated = ReplicaCore(config)

    async def main():
        results = []
        for i, ids in enumerate(PROMPTS):
            expected = await _tokens(colocated.generate(_request(ids, f"c{i}")))
            prefilled = await prefill.prefill(_request(ids, f"r{i}"))
            got = await _tokens(decode.generate(_request(ids, f"r{i}"), prefilled))
            results.append((expected, prefilled, got))
        return results

    for (expected, prefilled, got), ids in zip(asyncio.run(main()), PROMPTS, strict=True):
        assert got == expected, "seeded sampling included: the decode side samples the first token itself"
        assert prefilled.blocks == (len(ids) - 1) // 8 and prefilled.cached_tokens == 0
    stats = decode.stats()
    assert stats["kv_imports"] == 2 and stats["kv_import_failures"] == 0
    assert stats["kv_imported_blocks"] > 0 and stats["kv_imported_bytes"] == prefill.stats()["kv_exported_bytes"] > 0
    engine = decode.core.engine.engine.stats()
    assert engine.prefix_hit_tokens == sum((len(ids) - 1) // 8 * 8 for ids in PROMPTS), "the prompts were hits"
    assert prefill.stats()["kv_prefills"] == 2 and len(transport) == 0
    assert decode.core.stats()["kv_blocks_held"] == 0 == prefill.core.stats()["kv_blocks_held"]


def test_an_export_that_cannot_be_taken_costs_only_the_prompts_compute(config):
    decode = KVHandoff(ReplicaCore(config), InProcessKVTransport())
    request = _request(PROMPTS[0], "lost")
    expected = asyncio.run(_tokens(ReplicaCore(config).generate(request)))
    lost = Prefilled(handle=41, blocks=7, nbytes=1, cached_tokens=48)
    assert asyncio.run(_tokens(decode.generate(request, lost))) == expected, "cached tokens its own: none"
    assert decode.stats()["kv_import_failures"] == 1 and decode.stats()["kv_imports"] == 0


def test_a_request_with_images_is_not_prefilled_apart(config):
    from herd.engine.errors import HerdError

    prefill = KVHandoff(ReplicaCore(config), InProcessKVTransport())
    request = _request(PROMPTS[0], "img")
    request.images.append(b"not read")
    with pytest.raises(HerdError, match="images is not prefilled apart"):
        asyncio.run(prefill.prefill(request))
