"""The in-process KV transport: an export put is taken back whole, once."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from herd.engine.kv_export import KVExport, KVExportLayout
from herd.workers.kv_transport import InProcessKVTransport, Prefilled, RayKVHandle, RayKVTransport, kv_transport

EXPORT = KVExport(layout=KVExportLayout(model="m", dtype="torch.float32", block_size=2,
                                        cache_layers=(("full", (((2, 1, 4), "torch.float32"),)),)),
                  salt="tenant:a", token_ids=(1, 2, 3, 4), tensors=((torch.arange(16.0).view(2, 2, 1, 4),),))


def test_an_export_is_taken_back_once():
    transport = InProcessKVTransport()

    async def main():
        first, second = await transport.put(EXPORT), await transport.put(EXPORT)
        assert first != second and len(transport) == 2
        got = await transport.take(first)
        with pytest.raises(LookupError, match="taken already"):
            await transport.take(first)
        return got

    got = asyncio.run(main())
    assert got is EXPORT and len(transport) == 1


def test_what_crosses_serve_pickles_and_the_settings_name_ray():
    prefilled = Prefilled(handle=3, blocks=2, nbytes=EXPORT.nbytes, cached_tokens=0)
    assert pickle.loads(pickle.dumps(prefilled)) == prefilled
    again = pickle.loads(pickle.dumps(EXPORT))
    assert again.keys_for(EXPORT.layout, {"full": 2}) == EXPORT.keys_for(EXPORT.layout, {"full": 2})
    assert torch.equal(again.tensors[0][0], EXPORT.tensors[0][0]) and EXPORT.nbytes == 64
    assert isinstance(kv_transport("ray"), RayKVTransport)
    with pytest.raises(TypeError, match="RayKVHandle"):
        asyncio.run(RayKVTransport().take(3))
    assert RayKVHandle.__dataclass_fields__["ref"]
