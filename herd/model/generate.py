"""Greedy decoding of one sequence with the contiguous KV cache.

The plainest correct decode loop: the reference that the engine's batched, paged decoding must
reproduce token for token, and what `herd generate` runs.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from herd.model.llama4 import Llama4Model


def greedy_decode(
    model: Llama4Model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    stop_ids: Collection[int] = (),
) -> list[int]:
    """New token ids after `prompt_ids`, stopping at a stop id (included) or after max_new_tokens."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cache = model.new_cache()
    logits = model(torch.tensor(list(prompt_ids), dtype=torch.long), cache=cache)  # [T, V]
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        token = int(torch.argmax(logits[-1]))
        generated.append(token)
        if token in stop_ids:
            break
        logits = model(torch.tensor([token], dtype=torch.long), cache=cache)  # [1, V]
    return generated
