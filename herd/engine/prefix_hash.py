"""Prefix-cache keys: a hash chain over full blocks, salted per tenant (or sharing group).

Block i's key hashes the key of block i-1, the salt and block i's token ids, so two sequences share
block i's key only when they agree on every token up to its end and on the salt. The salt keeps one
tenant from reusing, or timing, another tenant's cached prefix. A block that overlaps an image's
placeholders also hashes that image's digest: its KV depends on the pixels, not only on the token ids
(which are the same ``<|patch|>`` for every image of a grid), and through the chain so does every later
block. SHA-256 keeps collisions out of reach.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from herd.engine.prompt_images import ImageSpan


def cache_salt(tenant_id: str, sharing_group: str | None) -> str:
    """The salt of a request's chain: its sharing group's when it names one, else its tenant's."""
    return f"group:{sharing_group}" if sharing_group else f"tenant:{tenant_id}"


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str, *, start: int = 0,
                 parent: bytes | None = None, images: Sequence[ImageSpan] = ()) -> list[bytes]:
    """Keys of the full blocks of token_ids from block `start` on, continuing the chain from `parent`."""
    keys: list[bytes] = []
    previous = parent if parent is not None else hashlib.sha256(b"herd-prefix\0" + salt.encode()).digest()
    for first in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        end = first + block_size
        block = token_ids[first:end]
        pixels = b"".join(image.digest for image in images if image.start < end and image.end > first)
        previous = hashlib.sha256(previous + struct.pack(f"<{block_size}q", *block) + pixels).digest()
        keys.append(previous)
    return keys
