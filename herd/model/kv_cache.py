"""The simplest KV cache: every key and value of one sequence, per layer, kept whole.

Legend: S cached tokens, K key/value heads, D head dim. It is the reference the engine's paged,
chunk-aware cache is checked against, and what lets the model decode one token at a time.
"""

from __future__ import annotations

import torch


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
    """One LayerKV per decoder layer."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(num_layers)]

    def __len__(self) -> int:
        """Tokens cached so far."""
        return len(self.layers[0])
