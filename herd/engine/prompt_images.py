"""The images of one prompt as the engine holds them: features to place, spans to key the prefix cache.

Legend: M placeholder tokens of the prompt (all images), H text hidden size, N tiles of one image,
F features per tile.

Invariant: the prompt's ``<|patch|>`` placeholders, in order, take the images' features in order: the
first N_0*F placeholders are image 0's, the next image 1's, and so on. Each image's span runs from its
first placeholder to one past its last; any prefix-cache block that overlaps a span carries that
image's digest in its key, so two prompts with the same token ids but different pixels never share
a block that depends on the pixels (every block from the image's first placeholder on).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageInput:
    """One image, preprocessed: what a caller gives the engine."""

    pixel_values: torch.Tensor
    """[N, 3, t, t] normalised tiles (herd.model.image_processor), tiles then the global tile."""


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's placeholders lie in the prompt, and what identifies its pixels."""

    start: int
    """Prompt position of its first placeholder."""
    end: int
    """One past its last placeholder."""
    digest: bytes
    """SHA-256 of its pixel values (dtype, shape and bytes)."""


@dataclass(frozen=True)
class PromptImages:
    """Every image of one prompt, placed."""

    positions: torch.Tensor
    """[M] long, ascending: prompt positions of the placeholders."""
    features: torch.Tensor
    """[M, H]: the feature that replaces each placeholder's embedding."""
    spans: tuple[ImageSpan, ...]

    @classmethod
    def place(cls, prompt_ids: Sequence[int], placeholder_id: int, features: Sequence[torch.Tensor],
              digests: Sequence[bytes]) -> PromptImages:
        """Give each image (features [N_i*F, H]) the next run of placeholders; ValueError if the counts differ."""
        positions = [i for i, token in enumerate(prompt_ids) if token == placeholder_id]
        needed = sum(f.shape[0] for f in features)
        if len(positions) != needed:
            raise ValueError(
                f"the prompt holds {len(positions)} image placeholder tokens (id {placeholder_id}) but its "
                f"{len(features)} image(s) give {needed} features; each image's tokens must come from its own grid"
            )
        spans, first = [], 0
        for image_features, digest in zip(features, digests, strict=True):
            last = first + image_features.shape[0] - 1
            spans.append(ImageSpan(positions[first], positions[last] + 1, digest))
            first = last + 1
        return cls(torch.tensor(positions, dtype=torch.long), torch.cat(list(features)), tuple(spans))

    def within(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Placeholders in prompt positions [start, end): (their offsets from start [k], features [k, H])."""
        lo = int(torch.searchsorted(self.positions, start))
        hi = int(torch.searchsorted(self.positions, end))
        return self.positions[lo:hi] - start, self.features[lo:hi]


def pixel_digest(pixel_values: torch.Tensor) -> bytes:
    """SHA-256 over an image's pixel values: equal only for equal dtype, shape and values."""
    flat = pixel_values.detach().cpu().contiguous().flatten().view(torch.uint8)  # raw bytes, any dtype
    head = f"{pixel_values.dtype}:{tuple(pixel_values.shape)}\0".encode()
    return hashlib.sha256(head + flat.numpy().tobytes()).digest()
