"""The KV tensors behind the block tables: per layer, keys and values of every block of its group.

Legend: N blocks in the layer's group, B tokens per block, K key/value heads, D head dim, S tokens.

With an FP8 cache (kv_dtype float8_e4m3fn: EngineConfig.kv_cache_dtype "fp8") the pools hold e4m3 bytes (uint8)
and beside them a float32 scale per (token, kv head) of each block (herd.engine.fp8_kv); `read` dequantises, so
attention sees keys and values in the model's dtype either way.

Each pool holds one block more than the layout gives its group: the scratch block (index N), which no block
table ever names. The padding rows of a padded decode step (herd.engine.decode_graphs) write their keys and
values there and read only there, so they never touch a block a sequence or the prefix cache holds.
"""

from __future__ import annotations

import torch

from herd.engine import fp8_kv
from herd.engine.kv_cache_manager import CHUNKED, FULL, KVLayout
from herd.model.config import TextConfig


def layer_groups(config: TextConfig) -> list[str]:
    """The KV group of each layer: chunked local attention, or full (global) attention."""
    return [CHUNKED if config.chunk_size(i) is not None else FULL for i in range(config.num_hidden_layers)]


def layer_bytes_per_block(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one block of one layer takes: keys and values in `dtype`, and with float8_e4m3fn (the FP8 cache) one
    byte an element plus their float32 scales, one per token and kv head."""
    if dtype == fp8_kv.FP8:
        scales = torch.finfo(fp8_kv.SCALE_DTYPE).bits // 8
        return 2 * block_size * num_kv_heads * (head_dim + scales)
    return 2 * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def bytes_per_block(config: TextConfig, block_size: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes one block of each group takes over all of that group's layers (keys and values, in the KV cache's
    dtype: float8_e4m3fn counts the FP8 cache's scales too)."""
    per_layer = layer_bytes_per_block(block_size, config.num_key_value_heads, config.head_dim, dtype)
    groups = layer_groups(config)
    return {g: per_layer * groups.count(g) for g in sorted(set(groups))}


class PagedKVCache:
    """k[layer], v[layer]: [N + 1, B, K, D] for the layer's group pool, the last block the group's scratch; in an FP8
    cache uint8 (e4m3 bytes), with k_scale[layer], v_scale[layer]: [N + 1, B, K] float32 beside them."""

    def __init__(self, config: TextConfig, layout: KVLayout, *, dtype: torch.dtype, device: torch.device,
                 kv_dtype: torch.dtype | None = None) -> None:
        """`dtype`: the model's, what `write` takes and `read` returns; `kv_dtype`: what the cache stores (None: the
        same; float8_e4m3fn: FP8 with per (token, kv head) scales)."""
        if kv_dtype not in (None, dtype, fp8_kv.FP8):
            raise ValueError(f"the KV cache stores {dtype} or {fp8_kv.FP8}, not {kv_dtype}")
        self.dtype = dtype
        self.fp8 = kv_dtype == fp8_kv.FP8
        self.block_size = layout.block_size
        self.groups: list[str] = []
        self.scratch_block = dict(layout.num_blocks)
        """Each group's scratch block: one past the blocks its pool hands out."""
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.k_scale: list[torch.Tensor] = []
        self.v_scale: list[torch.Tensor] = []
        self._device = device
        for group in layer_groups(config):
            self._add(group, config.num_key_value_heads, config.head_dim)

    def _add(self, group: str, num_kv_heads: int, head_dim: int) -> int:
        blocks = self.scratch_block[group] + 1
        storage = torch.uint8 if self.fp8 else self.dtype
        for pool in (self.k, self.v):
            pool.append(torch.zeros(blocks, self.block_size, num_kv_heads, head_dim, dtype=storage,
                                    device=self._device))
        if self.fp8:
            for scales in (self.k_scale, self.v_scale):
                scales.append(torch.ones(blocks, self.block_size, num_kv_heads, dtype=fp8_kv.SCALE_DTYPE,
                                         device=self._device))
        self.groups.append(group)
        return len(self.groups) - 1

    def add_layer(self, group: str, num_kv_heads: int, head_dim: int) -> int:
        """One more layer's keys and values on `group`'s blocks (a draft model's layer that follows the target's block
        tables: herd.engine.speculative); its index, for write, read and copy_blocks alike."""
        if group not in self.scratch_block:
            raise ValueError(f"the cache has no {group!r} layer group (it has {sorted(self.scratch_block)})")
        return self._add(group, num_kv_heads, head_dim)

    def layer_tensors(self, layer: int) -> list[torch.Tensor]:
        """Every tensor that holds the layer's blocks, each indexed by block in its first dimension (keys, values, and
        whatever else a block's contents need: an FP8 cache's scales): what moving a block elsewhere and back must
        carry."""
        if self.fp8:
            return [self.k[layer], self.v[layer], self.k_scale[layer], self.v_scale[layer]]
        return [self.k[layer], self.v[layer]]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [S, K, D] (the model's dtype) at flat slots [S] (block * B + offset)."""
        if not self.fp8:
            self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
            self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)
            return
        for pool, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, scale = fp8_kv.quantize_fp8(x)  # [S, K, D] uint8, [S, K]
            pool[layer].view(-1, *q.shape[1:]).index_copy_(0, slots, q)
            scales[layer].view(-1, scale.shape[1]).index_copy_(0, slots, scale)

    def copy_blocks(self, copies: list[tuple[str, int, int]]) -> None:
        """Copy whole blocks (group, source, destination) in every layer of their group, scales with them:
        copy-on-write of a block forked sequences shared (herd.engine.kv_cache_manager)."""
        for group in {g for g, _, _ in copies}:
            pairs = [(src, dst) for g, src, dst in copies if g == group]
            device = self.k[0].device
            src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=device)  # [P]
            dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=device)  # [P]
            for layer, layer_group in enumerate(self.groups):
                if layer_group == group:
                    for tensor in self.layer_tensors(layer):
                        tensor.index_copy_(0, dst, tensor.index_select(0, src))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values stored at flat slots [S]: k, v [S, K, D] in the model's dtype (dequantised from FP8)."""
        k, v = self.k[layer], self.v[layer]
        keys, values = k.view(-1, *k.shape[2:]).index_select(0, slots), v.view(-1, *v.shape[2:]).index_select(0, slots)
        if not self.fp8:
            return keys, values
        heads = k.shape[2]
        k_scale = self.k_scale[layer].view(-1, heads).index_select(0, slots)  # [S, K]
        v_scale = self.v_scale[layer].view(-1, heads).index_select(0, slots)  # [S, K]
        return fp8_kv.dequantize_fp8(keys, k_scale, self.dtype), fp8_kv.dequantize_fp8(values, v_scale, self.dtype)
