"""Where attention keeps and reads keys and values: the interface the model's forward takes, and the simplest
cache behind it, every key and value of one sequence, per layer, kept whole.

Legend: T new tokens, S cached tokens, N query heads, K key/value heads, D head dim. The contiguous cache is
the reference the engine's paged, chunk-aware one (herd.engine.paged_attention) is checked against, and what
lets the model decode one token at a time. The model never knows which one it runs on.
"""

from __future__ import annotations

from typing import Protocol

import torch

from herd.model.causal_attention import attend


class KVContext(Protocol):
    """The keys and values the model's attention layers store to and read from, for one forward."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               chunk_size: int | None) -> torch.Tensor:
        """Keep layer `layer`'s new k, v [T, K, D] at `positions` [T], then attend q [T, N, D] to everything
        the tokens may see (causal, within their chunk when chunk_size is set) -> [T, N, D]."""
        ...


class LayerKV:
    """Keys, values and their positions for one layer of one sequence."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # [S, K, D]
        self.v: torch.Tensor | None = None  # [S, K, D]
        self.positions: torch.Tensor | None = None  # [S]

    def append(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add new tokens; return all cached keys, values and positions including them."""
        if self.k is None or self.v is None or self.positions is None:
            self.k, self.v, self.positions = k, v, positions
        else:
            self.k = torch.cat([self.k, k])
            self.v = torch.cat([self.v, v])
            self.positions = torch.cat([self.positions, positions])
        return self.k, self.v, self.positions

    def __len__(self) -> int:
        return 0 if self.positions is None else int(self.positions.shape[0])


class ContiguousKVCache:
    """One LayerKV per decoder layer; a KVContext."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               chunk_size: int | None) -> torch.Tensor:
        keys, values, key_positions = self.layers[layer].append(k, v, positions)
        return attend(q, keys, values, positions, key_positions, chunk_size)

    def __len__(self) -> int:
        """Tokens cached so far."""
        return len(self.layers[0])
