"""Images for tests: random PNGs, PNGs that only claim a size (for the decompression-bomb guard), and the
reference's preprocessing of a set of PNGs (tests/data/llama4_pixels, made by its generate.py)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "data" / "llama4_pixels" / "reference.safetensors"
Case = dict[str, Any]
"""One entry of the golden file's ``cases`` metadata: name, tile_px, max_tiles, grid, shape, sha256, stored."""


def random_png(width: int, height: int, seed: int = 0) -> bytes:
    """An RGB PNG of uniform random pixels."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (1-bit grey) but carries no pixel data: cheap to build."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@lru_cache(maxsize=1)
def golden() -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The golden file's metadata and tensors: ``<case>.png``, ``<case>.pixel_values``, ``<case>.aspect_ratios``."""
    with safe_open(str(GOLDEN), framework="pt") as f:
        metadata: dict[str, str] = f.metadata()
    return metadata, load_file(GOLDEN)


def golden_cases(*, stored: bool) -> list[Case]:
    """The cases whose whole tensor is kept (``stored``), or those kept only as a shape and a SHA-256."""
    cases: list[Case] = json.loads(golden()[0]["cases"])
    return [case for case in cases if case["stored"] is stored]
