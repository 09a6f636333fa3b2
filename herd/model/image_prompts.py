"""A checkpoint's image handling as the front doors and replicas need it: bytes -> grid -> prompt text.

Two places use the same rules, so both read them from here:
- the gateway reads each image's header for its size (no pixels decoded), picks its tile grid and puts
  the grid's placeholder text where the chat template left ``<|image|>``, so the prompt is tokenized,
  counted and checked against the context limit before it goes anywhere;
- the replica decodes the same bytes in full and cuts them into tiles on the same grid, so the
  number of features equals the number of placeholders (the engine checks that too).

The rules come from the checkpoint: its ``preprocessor_config.json`` (transformers' Llama 4 image
processor settings: tile ``size``, ``max_patches``) and its vision config (features per tile, tile side).
A text-only checkpoint has none: ``ImagePrompts.from_pretrained`` returns None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from herd.model.config import load_config, read_json_object
from herd.model.image_processor import (
    IMAGE_MEAN,
    IMAGE_STD,
    RESCALE_FACTOR,
    ImageProcessorConfig,
    TileGrid,
    best_fit_grid,
    decode_image,
    image_prompt,
    open_image,
    preprocess,
)
from herd.model.special_tokens import IMAGE
from herd.model.vision_config import load_vision_config

PREPROCESSOR_CONFIG = "preprocessor_config.json"

_FIXED = {"image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD), "rescale_factor": RESCALE_FACTOR,
          "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resize_to_max_canvas": False}
"""Processor settings Herd implements only at the Llama 4 release values; a checkpoint asking for others
is refused rather than served differently from the reference."""


@dataclass(frozen=True)
class ImagePrompts:
    """How one checkpoint turns images into tiles and prompt text."""

    processor: ImageProcessorConfig
    tokens_per_tile: int
    """<|patch|> tokens (image features) per tile."""

    @classmethod
    def from_pretrained(cls, path: str | Path, **limits: int) -> ImagePrompts | None:
        """The checkpoint's rules (None for a text-only one); `limits` override max_side_px / max_pixels."""
        if not load_config(path).multimodal:
            return None
        vision = load_vision_config(path)
        raw = _read_preprocessor(Path(path))
        size = raw.get("size", {"height": vision.image_size, "width": vision.image_size})
        if not isinstance(size, dict) or size.get("height") != size.get("width"):
            raise ValueError(f"{path}/{PREPROCESSOR_CONFIG}: size must be a square {{height, width}}, got {size!r}")
        if size["height"] != vision.image_size:
            raise ValueError(f"{path}/{PREPROCESSOR_CONFIG}: tile size {size['height']} differs from the vision "
                             f"tower's image_size {vision.image_size}")
        for key, value in _FIXED.items():
            if key in raw and raw[key] != value:
                raise ValueError(f"{path}/{PREPROCESSOR_CONFIG}: {key}={raw[key]!r} is not supported "
                                 f"(Herd implements {value!r}, the Llama 4 value)")
        processor = ImageProcessorConfig(tile_px=vision.image_size, max_tiles=raw.get("max_patches", 16), **limits)
        return cls(processor=processor, tokens_per_tile=vision.tokens_per_tile)

    def grid(self, data: bytes) -> TileGrid:
        """The tile grid of an encoded image, from its header; ValueError for what is not a safe image."""
        width, height = open_image(data, self.processor).size
        return best_fit_grid(height, width, self.processor)

    def expand(self, text: str, grids: Sequence[TileGrid]) -> str:
        """Replace the i-th ``<|image|>`` of a rendered chat with image i's placeholder text."""
        pieces = text.split(IMAGE)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"the rendered prompt has {len(pieces) - 1} image markers ({IMAGE}) for "
                             f"{len(grids)} images; {IMAGE} is reserved and may not appear in message text")
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:], strict=True):
            out += [image_prompt(grid, self.tokens_per_tile), piece]
        return "".join(out)

    def pixel_values(self, data: bytes) -> torch.Tensor:
        """[N(+1), 3, t, t] tiles of an encoded image, decoded in full; ValueError for a bad image."""
        return preprocess(decode_image(data, self.processor), self.processor).pixel_values


def preprocessor_config(processor: ImageProcessorConfig) -> dict[str, Any]:
    """The ``preprocessor_config.json`` transformers' Llama 4 processor reads, for these settings."""
    return {
        "image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
        "size": {"height": processor.tile_px, "width": processor.tile_px}, "max_patches": processor.max_tiles,
        "resample": 2, **_FIXED,  # 2: bilinear
    }


def _read_preprocessor(path: Path) -> dict[str, Any]:
    file = path / PREPROCESSOR_CONFIG
    return read_json_object(file) if file.is_file() else {}
