"""The KV tensors behind the block tables: per layer, keys and values of every block of its group.

Legend: N blocks in the layer's group, B tokens per block, K key/value heads, D head dim, S tokens.

Each pool holds one block more than the layout gives its group: the scratch block (index N), which no block
table ever names. The padding rows of a padded decode step (herd.engine.decode_graphs) write their keys and
values there and read only there, so they never touch a block a sequence or the prefix cache holds.
"""

from __future__ import annotations

import torch

from herd.engine.kv_cache_manager import CHUNKED, FULL, KVLayout
from herd.model.config import TextConfig


def layer_groups(config: TextConfig) -> list[str]:
    """The KV group of each layer: chunked local attention, or full (global) attention."""
    return [CHUNKED if config.chunk_size(i) is not None else FULL for i in range(config.num_hidden_layers)]


def bytes_per_block(config: TextConfig, block_size: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes one block of each group takes over all of that group's layers (keys and values)."""
    per_layer = 2 * block_size * config.num_key_value_heads * config.head_dim * torch.finfo(dtype).bits // 8
    groups = layer_groups(config)
    return {g: per_layer * groups.count(g) for g in sorted(set(groups))}


class PagedKVCache:
    """k[layer], v[layer]: [N + 1, B, K, D] for the layer's group pool, the last block the group's scratch."""

    def __init__(self, config: TextConfig, layout: KVLayout, *, dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = layout.block_size
        self.groups = layer_groups(config)
        self.scratch_block = dict(layout.num_blocks)
        """Each group's scratch block: one past the blocks its pool hands out."""
        shape = (layout.block_size, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(layout.num_blocks[g] + 1, *shape, dtype=dtype, device=device) for g in self.groups]
        self.v = [torch.zeros(layout.num_blocks[g] + 1, *shape, dtype=dtype, device=device) for g in self.groups]

    def add_layer(self, group: str, num_kv_heads: int, head_dim: int) -> int:
        """One more layer's keys and values on `group`'s blocks (a draft model's layer that follows the target's block
        tables: herd.engine.speculative); its index, for write, read and copy_blocks alike."""
        if group not in self.scratch_block:
            raise ValueError(f"the cache has no {group!r} layer group (it has {sorted(self.scratch_block)})")
        shape = (self.scratch_block[group] + 1, self.block_size, num_kv_heads, head_dim)
        like = self.k[0]
        self.k.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
        self.v.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
        self.groups.append(group)
        return len(self.groups) - 1

    def layer_tensors(self, layer: int) -> list[torch.Tensor]:
        """Every tensor that holds the layer's blocks, each indexed by block in its first dimension (keys, values, and
        whatever else a block's contents need): what moving a block elsewhere and back must carry."""
        return [self.k[layer], self.v[layer]]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [S, K, D] at flat slots [S] (block * B + offset)."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def copy_blocks(self, copies: list[tuple[str, int, int]]) -> None:
        """Copy whole blocks (group, source, destination) in every layer of their group: copy-on-write of a block
        forked sequences shared (herd.engine.kv_cache_manager)."""
        for group in {g for g, _, _ in copies}:
            pairs = [(src, dst) for g, src, dst in copies if g == group]
            device = self.k[0].device
            src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=device)  # [P]
            dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=device)  # [P]
            for layer, layer_group in enumerate(self.groups):
                if layer_group == group:
                    self.k[layer].index_copy_(0, dst, self.k[layer].index_select(0, src))
                    self.v[layer].index_copy_(0, dst, self.v[layer].index_select(0, src))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values stored at flat slots [S]: k, v [S, K, D]."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]).index_select(0, slots), v.view(-1, *v.shape[2:]).index_select(0, slots)
