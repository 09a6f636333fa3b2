"""The FP8 KV cache's storage: e4m3 bytes with a float32 scale per (token, kv head), read back dequantised in the
model's dtype within e4m3's rounding, its bytes what bytes_per_block says, and its scales carried by every block
move (copy_blocks, layer_tensors, add_layer)."""

from __future__ import annotations

import pytest
import torch

from herd.engine import fp8_kv
from herd.engine.kv_cache_manager import CHUNKED, FULL, KVLayout
from herd.engine.paged_kv import PagedKVCache, bytes_per_block
from herd.model.config import TextConfig

B, K, D = 4, 2, 8  # tokens per block, key/value heads, head dim
CPU = torch.device("cpu")
FP8 = torch.float8_e4m3fn
E4M3_RELATIVE = 2**-4
"""Half an e4m3 step at the top of a binade (3 mantissa bits): the worst relative rounding of a normal value."""


def config(layers: int = 8) -> TextConfig:
    return TextConfig.from_hf({"num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": K,
                               "head_dim": D, "hidden_size": 32, "vocab_size": 64, "intermediate_size": 16,
                               "attention_chunk_size": 16})


def layout(full: int = 6, chunked: int = 3) -> KVLayout:
    return KVLayout(block_size=B, chunk_size=16, num_blocks={FULL: full, CHUNKED: chunked},
                    bytes_per_block={FULL: 1, CHUNKED: 1})


def fp8_cache(dtype: torch.dtype = torch.float32, **blocks: int) -> PagedKVCache:
    return PagedKVCache(config(), layout(**blocks), dtype=dtype, device=CPU, kv_dtype=FP8)


def test_quantize_scales_each_token_and_heads_vector_to_its_own_amax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, K, D, generator=g) * torch.tensor([1e-3, 1.0, 50.0, 1e4, 1.0])[:, None, None]
    x[1, 0] = 0  # a zero vector: scale 1, read back as zeros
    q, scale = fp8_kv.quantize_fp8(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape and scale.shape == (5, K) and scale.dtype == torch.float32
    assert float(scale[1, 0]) == 1.0
    amax = x.abs().amax(-1)
    assert torch.allclose(scale[amax > 0], amax[amax > 0] / 448)
    assert torch.equal(q.view(FP8).float().abs().amax(-1)[amax > 0], torch.full_like(amax[amax > 0], 448.0))
    back = fp8_kv.dequantize_fp8(q, scale, torch.float32)
    assert not back[1, 0].any()
    assert ((back - x).abs() <= E4M3_RELATIVE * amax[..., None] + 1e-30).all(), "within e4m3 rounding of each amax"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_pools_hold_bytes_and_scales_and_take_what_bytes_per_block_says(dtype):
    cache = fp8_cache(dtype, full=5, chunked=7)
    held = {FULL: 0, CHUNKED: 0}
    for layer, group in enumerate(cache.groups):
        tensors = cache.layer_tensors(layer)
        assert [t.dtype for t in tensors] == [torch.uint8, torch.uint8, torch.float32, torch.float32]
        assert len({t.shape[0] for t in tensors}) == 1, "every tensor is block-indexed in dim 0"
        held[group] += sum(t.nbytes for t in tensors)
    sizes = bytes_per_block(config(), B, FP8)
    assert held == {FULL: (5 + 1) * sizes[FULL], CHUNKED: (7 + 1) * sizes[CHUNKED]}
    bf16 = bytes_per_block(config(), B, torch.bfloat16)
    assert sizes[FULL] == bf16[FULL] * (D + 4) // (2 * D), "one byte an element, four more per token and head"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_reads_what_was_written_within_e4m3_rounding_in_the_models_dtype(dtype):
    cache = fp8_cache(dtype)
    g = torch.Generator().manual_seed(1)
    slots = torch.tensor([21, 0, 5, 13, 4])
    k = (torch.randn(5, K, D, generator=g) * 3).to(dtype)
    v = (torch.randn(5, K, D, generator=g) / 7).to(dtype)
    cache.write(3, slots, k, v)
    got_k, got_v = cache.read(3, slots)
    assert got_k.dtype == got_v.dtype == dtype and got_k.shape == k.shape
    for got, want in ((got_k, k), (got_v, v)):
        amax = want.float().abs().amax(-1, keepdim=True)
        slack = E4M3_RELATIVE + (2**-8 if dtype == torch.bfloat16 else 0)  # bfloat16's own rounding on the way out
        assert ((got.float() - want.float()).abs() <= slack * amax).all()
        assert not torch.equal(got.float(), want.float()), "stored in fp8, not the model's dtype"
    assert not cache.read(3, torch.tensor([1, 2]))[0].any(), "unwritten slots read as zeros"


def test_copy_blocks_carries_the_scales_so_a_forked_block_reads_the_same():
    cache = fp8_cache()
    g = torch.Generator().manual_seed(2)
    block = torch.arange(B)
    for layer in range(len(cache.groups)):
        src = block + (1 if cache.groups[layer] == FULL else 0) * B  # full: block 1; chunked: block 0
        scale = torch.tensor([10.0 ** (layer % 4 - 2)])  # a different magnitude per layer: scales that matter
        cache.write(layer, src, torch.randn(B, K, D, generator=g) * scale, torch.randn(B, K, D, generator=g) * scale)
    before = [cache.read(layer, block + (1 if group == FULL else 0) * B) for layer, group in enumerate(cache.groups)]
    cache.copy_blocks([(FULL, 1, 4), (CHUNKED, 0, 2)])
    for layer, group in enumerate(cache.groups):
        got_k, got_v = cache.read(layer, block + (4 if group == FULL else 2) * B)
        assert torch.equal(got_k, before[layer][0]) and torch.equal(got_v, before[layer][1]), layer


def test_add_layer_gets_fp8_storage_and_scales_on_its_groups_blocks():
    cache = fp8_cache()
    layer = cache.add_layer(FULL, num_kv_heads=1, head_dim=4)
    tensors = cache.layer_tensors(layer)
    assert [tuple(t.shape) for t in tensors] == [(7, B, 1, 4), (7, B, 1, 4), (7, B, 1), (7, B, 1)]
    k = torch.tensor([[[1.0, -2.0, 0.5, 448.0]]])
    cache.write(layer, torch.tensor([9]), k, -k)
    got_k, got_v = cache.read(layer, torch.tensor([9]))
    assert torch.equal(got_k, k) and torch.equal(got_v, -k), "scale 1: these values are exact in e4m3"


def test_the_cache_stores_the_models_dtype_or_fp8_only():
    with pytest.raises(ValueError, match="stores"):
        PagedKVCache(config(), layout(), dtype=torch.float32, device=CPU, kv_dtype=torch.float16)
    plain = PagedKVCache(config(), layout(), dtype=torch.bfloat16, device=CPU, kv_dtype=torch.bfloat16)
    assert not plain.fp8 and len(plain.layer_tensors(0)) == 2 and plain.k[0].dtype == torch.bfloat16
