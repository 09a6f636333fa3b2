"""Write ``reference.safetensors``: Llama 4 pixel values from transformers' own image processor.

Run it only with the side virtual environment that has torchvision (the project's .venv cannot import it)::

    /work/tvenv/bin/python tests/data/llama4_pixels/generate.py

That environment holds torch 2.14.1, torchvision 0.29.1, transformers 5.24.0, pillow and safetensors. The
script makes a few deterministic images (seeded numpy: gradients, waves, edges and noise, so that resizing
matters), encodes each as PNG, decodes the PNG with Pillow and runs transformers' ``Llama4ImageProcessor``
(``Llama4ImageProcessorFast`` in older releases, now a deprecated alias), built with explicit arguments and
no download. For each case the file keeps the PNG bytes (``<case>.png``, uint8) and, for the small-tile
configurations, the reference ``<case>.pixel_values`` (bfloat16, exact) and ``<case>.aspect_ratios``. For
the real configuration (336-pixel tiles, 16 tiles) only the shape and the SHA-256 of the pixel bytes are
kept, in the metadata, to keep the file small. The metadata's ``cases`` entry (JSON) lists every case.

On CPU, torchvision resizes uint8 images with torch's native uint8 kernel only where the CPU reports AVX2
or AVX512 (or is ARM); elsewhere it resizes in float32 and rounds, which gives other pixels. The script
refuses to run where the native path is not taken, so the golden data is the native path's.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import sys
from pathlib import Path

import numpy as np
import PIL
import safetensors
import torch
import torchvision
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import Llama4ImageProcessor

OUT = Path(__file__).with_name("reference.safetensors")

# name, (width, height), Pillow mode, tile side in pixels, max tiles, keep the tensor (else only its hash)
CASES: list[tuple[str, tuple[int, int], str, int, int, bool]] = [
    ("small_upscaled", (23, 17), "RGB", 56, 6, True),
    ("one_tile_downscaled", (131, 97), "RGB", 56, 1, True),
    ("grid_2x3_padded", (150, 100), "RGB", 56, 6, True),
    ("grid_2x3_downscaled", (400, 250), "RGB", 56, 6, True),
    ("wide_1x6", (500, 60), "RGB", 56, 6, True),
    ("tall_6x1", (45, 410), "RGB", 56, 6, True),
    ("odd_sizes", (337, 113), "RGB", 28, 6, True),
    ("grayscale", (90, 70), "L", 56, 6, True),
    ("rgba", (130, 77), "RGBA", 56, 6, True),
    ("real_3x4", (1600, 1200), "RGB", 336, 16, False),
    ("real_small_upscaled", (200, 150), "RGB", 336, 16, False),
]


def make_image(width: int, height: int, mode: str, seed: int, smooth: bool) -> Image.Image:
    """Gradients and waves with a few hard edges; noise unless ``smooth`` (which keeps big PNGs small)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(4):
        fx, fy = rng.uniform(0.5, 6.0, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
        ramp = (x / max(width - 1, 1) + (c % 2) * y / max(height - 1, 1)) / (1 + c % 2)
        value = 255 * (0.6 * wave + 0.4 * ramp)
        edges = ((x // max(width // 7, 1) + y // max(height // 5, 1)) % 2 == 0) & (rng.uniform() < 0.7)
        value = np.where(edges & (x > width / 2), 255 - value, value)
        if not smooth:
            value = value + rng.normal(0, 12, size=value.shape)
        channels.append(np.clip(np.rint(value), 0, 255).astype(np.uint8))
    if mode == "L":
        return Image.fromarray(channels[0], mode="L")
    if mode == "RGBA":
        return Image.fromarray(np.stack(channels, axis=-1), mode="RGBA")
    return Image.fromarray(np.stack(channels[:3], axis=-1), mode="RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def processor_arguments(tile_px: int, max_tiles: int) -> dict[str, object]:
    """Every argument the reference's defaults would give, spelled out; only the size and tile count vary."""
    return {
        "size": {"height": tile_px, "width": tile_px},
        "max_patches": max_tiles,
        "resize_to_max_canvas": False,
        "resample": 2,  # PILImageResampling.BILINEAR
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def pixel_sha256(pixel_values: torch.Tensor) -> str:
    """SHA-256 of the tensor's bytes, row-major, native (little-endian) bfloat16."""
    return hashlib.sha256(pixel_values.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512") and platform.machine() not in ("aarch64", "arm64"):
        sys.exit(f"CPU capability {capability}: torchvision would resize in float here, not with the uint8 kernel")
    tensors: dict[str, torch.Tensor] = {}
    cases = []
    for seed, (name, (width, height), mode, tile_px, max_tiles, keep) in enumerate(CASES):
        data = png_bytes(make_image(width, height, mode, seed, smooth=not keep))
        arguments = processor_arguments(tile_px, max_tiles)
        processor = Llama4ImageProcessor(**arguments)
        out = processor.preprocess([Image.open(io.BytesIO(data))], return_tensors="pt")
        pixel_values, aspect_ratios = out["pixel_values"], out["aspect_ratios"]
        rows, cols = (int(v) for v in aspect_ratios[0])
        tensors[f"{name}.png"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if keep:
            tensors[f"{name}.pixel_values"] = pixel_values.contiguous()
            tensors[f"{name}.aspect_ratios"] = aspect_ratios.contiguous()
        cases.append(
            {
                "name": name,
                "width": width,
                "height": height,
                "mode": mode,
                "tile_px": tile_px,
                "max_tiles": max_tiles,
                "grid": [rows, cols],
                "shape": list(pixel_values.shape),
                "dtype": str(pixel_values.dtype),
                "sha256": pixel_sha256(pixel_values),
                "stored": keep,
                "processor_arguments": arguments,
            }
        )
        print(f"{name}: {width}x{height} {mode} -> grid {rows}x{cols}, {tuple(pixel_values.shape)}, {len(data)} B")
    metadata = {
        "cases": json.dumps(cases),
        "processor": "transformers.Llama4ImageProcessor",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "cpu_capability": capability,
        "machine": platform.machine(),
    }
    save_file(tensors, str(OUT), metadata=metadata)
    OUT.chmod(0o644)  # safetensors writes 0600
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
