"""A prompt's KV moved between two engines (prefill/decode disaggregation, herd.engine.kv_export): the importer's
output is the colocated engine's token for token, its prompt's blocks are prefix hits (not recomputed) with the
logits of a hit on the exporter, another tenant gets nothing, and an engine of another layout refuses the export."""

from __future__ import annotations

import pickle

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.kv_cache_manager import FULL
from herd.engine.prefix_hash import block_hashes, cache_salt
from herd.model.tiny import make_tiny

BLOCK = 8  # half the tiny models' attention chunk (16): the chunked layers' last chunk is exported too
SMALL = dict(block_size=BLOCK, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_mb=2)
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
PROMPT = torch.randint(3, 400, (61,), generator=torch.Generator().manual_seed(0)).tolist()
HIT = 56  # 60 tokens looked up (the last is computed): 7 full blocks of 8
SALT = cache_salt("default", None)


@pytest.fixture(scope="module", params=["scout", "maverick"])
def tiny(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(request.param), preset=request.param, seed=4)


def _engine(path, **overrides) -> LLMEngine:
    return LLMEngine.from_pretrained(path, EngineConfig(**{**SMALL, **overrides}))


def _run(engine: LLMEngine, prompt: list[int] = PROMPT, **options):
    out = engine.generate([prompt], PARAMS, **options)[0]
    return out.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs], out.num_cached_tokens


def _nothing_held(engine: LLMEngine) -> bool:
    return all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def test_an_imported_prefix_is_a_hit_with_the_colocated_output(tiny):
    prefill, decode = _engine(tiny), _engine(tiny)
    colocated = _run(prefill, [*PROMPT[:-1], 7])  # same blocks, another last token: a prefill's own run
    plain = _run(_engine(tiny), PROMPT)
    export = pickle.loads(pickle.dumps(prefill.export_prefix(PROMPT, SALT)))  # as Ray's object store carries it
    assert export.num_blocks == HIT // BLOCK and len(export.token_ids) == HIT
    assert prefill.stats().kv_exported_blocks == HIT // BLOCK + 1, "every global block and the last chunk's one"
    written = decode.import_prefix(export)
    assert written == HIT // BLOCK + 1
    assert _nothing_held(decode), "imported blocks are cached, unreferenced, evictable"
    assert decode.import_prefix(export) == 0, "blocks already cached are skipped"
    imported = _run(decode)
    stats = decode.stats()
    assert imported[2] == HIT and stats.prefix_hit_tokens == HIT and stats.kv_imported_blocks == written
    assert imported[0] == plain[0], "the decode side's output is the colocated engine's, token for token"
    hit_on_prefill = _run(prefill)
    assert hit_on_prefill[2] == HIT and colocated[2] == 0
    assert imported[1] == hit_on_prefill[1], "the imported blocks hold exactly what the exporter's cache held"
    for (token, logprob, top), (token2, logprob2, top2) in zip(imported[1], plain[1], strict=True):
        assert token == token2 and logprob == pytest.approx(logprob2, abs=1e-5)  # recomputation: to rounding
        assert [t for t, _ in top] == [t for t, _ in top2]
    assert _nothing_held(decode) and _nothing_held(prefill)


def test_another_tenant_gets_no_hit_from_an_import(tiny):
    prefill, decode = _engine(tiny), _engine(tiny)
    _run(prefill, tenant_id="x")
    export = prefill.export_prefix(PROMPT, cache_salt("x", None))
    assert prefill.export_prefix(PROMPT, cache_salt("y", None)).num_blocks == 0, "y has nothing cached on prefill"
    assert decode.import_prefix(export) > 0
    assert _run(decode, tenant_id="y")[2] == 0, "x's blocks are keyed by x's salt: y finds none"
    assert _run(decode, tenant_id="x")[2] == HIT
    shared = _engine(tiny)
    _run(prefill, tenant_id="t1", sharing_group="team")
    assert shared.import_prefix(prefill.export_prefix(PROMPT, cache_salt("t1", "team"))) > 0
    assert _run(shared, tenant_id="t2", sharing_group="team")[2] == HIT, "a sharing group shares imports"


def test_an_export_comes_from_the_host_tier_too(tiny):
    prefill = _engine(tiny, kv_cache_mb=0.25, host_kv_cache_mb=1)  # 16 blocks a group
    expected = _run(prefill)[0]
    for seed in (1, 2, 3):  # push PROMPT's blocks off the device into the host tier
        _run(prefill, torch.randint(3, 400, (100,), generator=torch.Generator().manual_seed(seed)).tolist())
    keys = block_hashes(PROMPT[:HIT], BLOCK, SALT)
    assert not any(map(prefill.kv.pools[FULL].peek_cached, keys))
    export = prefill.export_prefix(PROMPT, SALT)
    assert export.num_blocks == HIT // BLOCK, "every block came from the host tier"
    decode = _engine(tiny)
    assert decode.import_prefix(export) == HIT // BLOCK + 1
    tokens, _, cached = _run(decode)
    assert cached == HIT and tokens == expected


def test_a_short_prompt_exports_nothing_and_a_pool_without_room_imports_nothing(tiny):
    prefill = _engine(tiny)
    _run(prefill, PROMPT[:BLOCK])
    assert prefill.export_prefix(PROMPT[:BLOCK], SALT).num_blocks == 0, "8 tokens: the last is computed, 7 cached"
    _run(prefill)
    export = prefill.export_prefix(PROMPT, SALT)
    decode = _engine(tiny, kv_cache_mb=0.25)  # 16 blocks a group
    decode.add_request(list(range(3, 103)), SamplingParams(max_tokens=50), request_id="running")
    decode.step()
    decode.step()  # its 100 prompt tokens computed: it holds 13 global blocks, 3 are free
    assert decode.import_prefix(export) == 0 and decode.stats().kv_imported_blocks == 0
    decode.abort("running")
    decode.step()
    assert decode.import_prefix(export) == HIT // BLOCK + 1, "the running request's blocks, cached now, are evicted"
    assert _run(decode)[2] == HIT


@pytest.mark.parametrize(("other", "message"), [
    ({"preset": "other"}, "model config"),
    ({"block_size": 16}, "block_size"),
    ({"kv_cache_dtype": "fp8"}, "cache layer 0"),
])
def test_an_importer_of_another_layout_refuses_the_export(tiny, tmp_path, other, message):
    prefill = _engine(tiny)
    _run(prefill)
    export = prefill.export_prefix(PROMPT, SALT)
    if other.get("preset"):
        preset = "maverick" if "scout" in str(tiny) else "scout"
        importer = _engine(make_tiny(tmp_path / preset, preset=preset, seed=4))
    else:
        importer = _engine(tiny, **other)
    with pytest.raises(ValueError, match=message):
        importer.import_prefix(export)
    assert _nothing_held(importer) and importer.stats().kv_imported_blocks == 0
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        _engine(tiny, enable_prefix_caching=False).import_prefix(export)
