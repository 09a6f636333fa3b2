"""PagedKVCache and its sizing: which layers share a pool, bytes per block, pools shaped by the layout,
and keys/values stored at flat slots read back exactly where block * B + offset says."""

from __future__ import annotations

import pytest
import torch

from herd.engine.kv_cache_manager import CHUNKED, FULL, KVLayout
from herd.engine.paged_kv import PagedKVCache, bytes_per_block, layer_groups
from herd.model.config import TextConfig

B, K, D = 4, 2, 8  # tokens per block, key/value heads, head dim
CPU = torch.device("cpu")


def config(layers: int = 8, chunk: int | None = 16) -> TextConfig:
    """Llama 4's iRoPE pattern: every fourth layer NoPE with full attention, the rest chunked."""
    return TextConfig.from_hf({"num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": K,
                               "head_dim": D, "hidden_size": 32, "vocab_size": 64, "intermediate_size": 16,
                               "attention_chunk_size": chunk})


def layout(full: int = 6, chunked: int | None = 3) -> KVLayout:
    num_blocks = {FULL: full} if chunked is None else {FULL: full, CHUNKED: chunked}
    return KVLayout(block_size=B, chunk_size=None if chunked is None else 16, num_blocks=num_blocks,
                    bytes_per_block=dict.fromkeys(num_blocks, 1))


def test_layer_groups_follow_the_attention_of_each_layer():
    c = config(layers=8)
    assert layer_groups(c) == [CHUNKED, CHUNKED, CHUNKED, FULL] * 2
    assert layer_groups(c) == [FULL if c.chunk_size(i) is None else CHUNKED for i in range(8)]
    assert layer_groups(config(layers=3, chunk=None)) == [FULL] * 3, "no chunk size: every layer is global"


@pytest.mark.parametrize(("dtype", "item_bytes"), [(torch.float32, 4), (torch.bfloat16, 2), (torch.float8_e4m3fn, 1)])
def test_bytes_per_block_counts_keys_and_values_of_every_layer_of_the_group(dtype, item_bytes):
    scales = 4 if dtype == torch.float8_e4m3fn else 0  # FP8: a float32 scale per token and kv head
    per_layer = 2 * B * K * (D * item_bytes + scales)  # keys and values
    assert bytes_per_block(config(layers=8), B, dtype) == {CHUNKED: 6 * per_layer, FULL: 2 * per_layer}
    assert bytes_per_block(config(layers=3, chunk=None), B, dtype) == {FULL: 3 * per_layer}


def test_bytes_per_block_is_what_a_cache_of_that_many_blocks_holds():
    c = config(layers=8)
    cache = PagedKVCache(c, layout(full=5, chunked=7), dtype=torch.bfloat16, device=CPU)
    held = {FULL: 0, CHUNKED: 0}
    for group, k, v in zip(cache.groups, cache.k, cache.v, strict=True):
        held[group] += k.nbytes + v.nbytes
    sizes = bytes_per_block(c, B, torch.bfloat16)
    assert held == {FULL: (5 + 1) * sizes[FULL], CHUNKED: (7 + 1) * sizes[CHUNKED]}, "and one scratch block each"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_layer_gets_a_pool_of_its_groups_size_and_the_dtype(dtype):
    cache = PagedKVCache(config(layers=8), layout(full=6, chunked=3), dtype=dtype, device=CPU)
    assert cache.block_size == B
    assert cache.groups == [CHUNKED, CHUNKED, CHUNKED, FULL] * 2
    assert cache.scratch_block == {FULL: 6, CHUNKED: 3}, "one past the blocks the pool hands out"
    for group, k, v in zip(cache.groups, cache.k, cache.v, strict=True):
        blocks = 6 if group == FULL else 3
        assert k.shape == v.shape == (blocks + 1, B, K, D)
        assert k.dtype == v.dtype == dtype and k.device == CPU
        assert not k.any() and not v.any()
    assert len({t.data_ptr() for t in cache.k + cache.v}) == 16, "no two layers share storage"


def test_a_model_without_chunked_layers_needs_no_chunked_pool():
    cache = PagedKVCache(config(layers=3, chunk=None), layout(full=4, chunked=None), dtype=torch.float32, device=CPU)
    assert [k.shape[0] for k in cache.k] == [4 + 1] * 3 and cache.scratch_block == {FULL: 4}


def test_what_is_written_at_slots_reads_back_there_and_nowhere_else():
    cache = PagedKVCache(config(layers=8), layout(full=6, chunked=3), dtype=torch.float32, device=CPU)
    g = torch.Generator().manual_seed(0)
    slots = torch.tensor([21, 0, 5, 13, 4])  # any order, across blocks; the full pool holds 6 * 4 = 24 slots
    k, v = torch.randn(5, K, D, generator=g), torch.randn(5, K, D, generator=g)
    cache.write(3, slots, k, v)  # layer 3: full attention

    got_k, got_v = cache.read(3, slots)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, B)
        assert torch.equal(cache.k[3][block, offset], k[i]) and torch.equal(cache.v[3][block, offset], v[i])
    written = torch.zeros((6 + 1) * B, dtype=torch.bool)
    written[slots] = True
    assert not cache.k[3].view(-1, K, D)[~written].any(), "every other slot is untouched"
    assert not any(t.any() for i, t in enumerate(cache.k + cache.v) if i not in (3, 8 + 3)), "other layers too"

    again = torch.tensor([13, 13, 2])
    got_k, _ = cache.read(3, again)
    assert torch.equal(got_k[0], k[3]) and torch.equal(got_k[1], k[3]) and not got_k[2].any()


def test_chunked_layers_address_their_own_smaller_pool():
    cache = PagedKVCache(config(layers=8), layout(full=6, chunked=3), dtype=torch.bfloat16, device=CPU)
    slots = torch.arange(3 * B)  # every slot of the chunked pool
    k = torch.randn(3 * B, K, D).to(torch.bfloat16)
    cache.write(0, slots, k, -k)
    got_k, got_v = cache.read(0, slots.flip(0))
    assert torch.equal(got_k, k.flip(0)) and torch.equal(got_v, -k.flip(0))
    with pytest.raises(IndexError):
        cache.write(1, torch.tensor([(3 + 1) * B]), k[:1], k[:1])  # one past the chunked pool's scratch block


def test_copy_blocks_copies_whole_blocks_of_the_named_group_only():
    cache = PagedKVCache(config(), layout(), dtype=torch.float32, device=CPU)
    for layer in range(len(cache.groups)):
        cache.k[layer].copy_(torch.randn_like(cache.k[layer]))
        cache.v[layer].copy_(torch.randn_like(cache.v[layer]))
    before_k = [k.clone() for k in cache.k]
    before_v = [v.clone() for v in cache.v]
    cache.copy_blocks([(FULL, 1, 4), (FULL, 2, 5), (CHUNKED, 0, 2)])
    for layer, group in enumerate(cache.groups):
        moves = {4: 1, 5: 2} if group == FULL else {2: 0}
        for block in range(cache.k[layer].shape[0]):
            src = moves.get(block, block)
            assert torch.equal(cache.k[layer][block], before_k[layer][src]), (layer, block)
            assert torch.equal(cache.v[layer][block], before_v[layer][src]), (layer, block)
