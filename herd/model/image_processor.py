"""Image preprocessing as Llama 4 does it: bytes -> RGB -> tile grid -> pixel tiles and prompt text.

Legend: R tile rows, C tile columns, N = R*C tiles (+1 global tile when N > 1), t tile side in pixels.

Invariant: the grid chosen for an image decides both the pixel tiles and the prompt text, so both are
computed from one ``TileGrid``; the model later replaces each ``<|patch|>`` with one image feature.

The grid choice follows transformers' ``Llama4ImageProcessor`` (``find_supported_resolutions`` and
``get_best_fit``): every (rows, cols) with rows*cols <= ``max_tiles``, in the reference's order; the
limiting-side scale of each canvas computed in float32; the smallest scale >= 1 if any, else the
largest below 1; ties broken by the smallest area, first in order. The image is resized without
distortion (never upscaled beyond one tile side), padded with black on the right and bottom, rescaled
by 1/255 and normalised with mean 0.5 and std 0.5 in bfloat16, cut into tiles row by row, and followed
by a global tile (the whole image squashed to t x t) when there is more than one tile.

Pixels are bit-for-bit those of transformers 5.24.0's ``Llama4ImageProcessor`` (torchvision backend) on
CPU. Its resize is ``torchvision.transforms.v2.functional.resize`` (bilinear, antialiased), which on a CPU
reporting AVX2 or AVX512 (or on ARM) hands the uint8 image straight to torch's native uint8 kernel:
fixed-point int16 weights and PIL's rounding, horizontal pass then vertical. We call that same kernel
without torchvision. Resizing in float and rounding, as torchvision does on other CPUs and on GPU, puts
about one value in ten one level off. ``tests/data/llama4_pixels`` holds the reference's output and the
script that made it.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from herd.model.special_tokens import (
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    PATCH,
    TILE_X_SEPARATOR,
    TILE_Y_SEPARATOR,
)

IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel mean, as in the reference's ``image_mean``."""
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel standard deviation, as in the reference's ``image_std``."""
RESCALE_FACTOR = 1 / 255
"""uint8 pixel -> [0, 1]."""
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP")
"""The only formats Pillow is let decode (its names): what images are sent in. Every other plugin (BMP, TIFF,
ICO, PPM, ...) is parser code reachable by any caller, so none is tried."""


@dataclass(frozen=True, kw_only=True)
class ImageProcessorConfig:
    """How images are decoded, checked and tiled."""

    tile_px: int = 336
    """Side of one square tile, in pixels."""
    max_tiles: int = 16
    """Most tiles (not counting the global tile) one image may be cut into (the reference's max_patches)."""
    max_side_px: int = 16384
    """Images wider or taller than this are refused."""
    max_pixels: int = 40_000_000
    """Images with more pixels than this are refused before decoding (decompression-bomb guard)."""

    def __post_init__(self) -> None:
        for name in ("tile_px", "max_tiles", "max_side_px", "max_pixels"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class TileGrid:
    """Tile rows x columns of one image."""

    rows: int
    cols: int

    @property
    def has_global_tile(self) -> bool:
        """The reference adds a global tile only when the image is cut into more than one tile."""
        return self.rows * self.cols > 1

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the vision tower, global tile included."""
        return self.rows * self.cols + int(self.has_global_tile)


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower."""

    pixel_values: torch.Tensor
    """[N(+1), 3, t, t] bfloat16, normalised; tiles row by row, then the global tile."""
    grid: TileGrid


def decode_image(data: bytes, config: ImageProcessorConfig) -> Image.Image:
    """Decode ``data`` into an RGB Pillow image, refusing what is not a safe, whole image."""
    image = open_image(data, config)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValueError(f"image is truncated or corrupt: {exc}") from exc
    return to_rgb(image)


def open_image(data: bytes, config: ImageProcessorConfig) -> Image.Image:
    """Read an image's header (no pixels decoded yet), refusing non-images and sizes over the limits."""
    try:
        with warnings.catch_warnings():
            # Our own limits below are the ones that count; Pillow's global warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ValueError(f"bytes are not a recognised image ({len(data)} bytes); the accepted formats are PNG, "
                         f"JPEG, GIF and WebP") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a known format with a broken header
        raise ValueError(f"image header is corrupt: {exc}") from exc
    width, height = image.size
    if width > config.max_side_px or height > config.max_side_px:
        raise ValueError(f"image is {width}x{height}, over the maximum side of {config.max_side_px} pixels")
    if width * height > config.max_pixels:
        raise ValueError(
            f"image is {width}x{height} = {width * height} pixels, over the maximum of {config.max_pixels} "
            f"(decompression-bomb guard)"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference's ``convert_to_rgb``: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def supported_grids(max_tiles: int) -> list[TileGrid]:
    """Every grid of at most ``max_tiles`` tiles, in the order the reference lists its canvases.

    The reference groups grids by aspect ratio (rows / cols), ratios in the order first met while the
    tile count falls from ``max_tiles`` to 1 and rows rise; within a ratio, larger grids come first.
    """
    by_ratio: dict[float, list[TileGrid]] = {}
    for count in range(max_tiles, 0, -1):
        for rows in range(1, count + 1):
            if count % rows == 0:
                cols = count // rows
                by_ratio.setdefault(rows / cols, []).append(TileGrid(rows, cols))
    return [grid for grids in by_ratio.values() for grid in grids]


def best_fit_grid(height: int, width: int, config: ImageProcessorConfig) -> TileGrid:
    """The grid whose canvas an image of ``height`` x ``width`` fits best, as the reference chooses."""
    grids = supported_grids(config.max_tiles)
    canvas_h = torch.tensor([g.rows * config.tile_px for g in grids], dtype=torch.float32)
    canvas_w = torch.tensor([g.cols * config.tile_px for g in grids], dtype=torch.float32)
    # float32 like the reference, so ties between canvases fall the same way.
    scales = torch.minimum(canvas_h / height, canvas_w / width).tolist()
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [g for g, s in zip(grids, scales, strict=True) if s == chosen]
    return min(candidates, key=lambda g: g.rows * g.cols)  # min keeps the first of equal areas


def image_prompt(grid: TileGrid, tokens_per_tile: int) -> str:
    """The prompt text standing for one image: tiles' patch runs, separators, then the global tile."""
    parts = [IMAGE_START]
    if grid.has_global_tile:
        tile = PATCH * tokens_per_tile
        for _ in range(grid.rows):
            parts.append(TILE_X_SEPARATOR.join([tile] * grid.cols))
            parts.append(TILE_Y_SEPARATOR)
    parts += [IMAGE, PATCH * tokens_per_tile, IMAGE_END]
    return "".join(parts)


def _resized_size(height: int, width: int, grid: TileGrid, tile_px: int) -> tuple[int, int]:
    """Size to resize to without distortion: inside the canvas, never upscaled past one tile side."""
    target_h = min(max(height, tile_px), grid.rows * tile_px)
    target_w = min(max(width, tile_px), grid.cols * tile_px)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(new_h, 1), max(new_w, 1)


def _resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, h, w] uint8 -> [3, *size] uint8, bilinear with antialiasing, as the reference resizes.

    Kept in uint8 on purpose: torch's uint8 kernel computes in fixed point and rounds differently from
    the float kernel, and it is the one the reference runs (see the module docstring).
    """
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    resized = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0]


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[3, h, w] uint8 -> bfloat16, rescaled and normalised in bfloat16 as the reference does."""
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.bfloat16)[:, None, None]
    std = torch.tensor(IMAGE_STD, dtype=torch.bfloat16)[:, None, None]
    return (pixels.to(torch.bfloat16) * RESCALE_FACTOR - mean) / std


def preprocess(image: Image.Image, config: ImageProcessorConfig) -> ProcessedImage:
    """Resize, pad, normalise and tile one RGB image."""
    rgb = to_rgb(image)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    # [3, h, w], made contiguous as the reference does, so its resize kernel sees the same layout.
    pixels = pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()
    grid = best_fit_grid(rgb.height, rgb.width, config)
    t = config.tile_px
    resized = _resize(pixels, _resized_size(rgb.height, rgb.width, grid, t))
    canvas = F.pad(resized, (0, grid.cols * t - resized.shape[2], 0, grid.rows * t - resized.shape[1]))
    tiles = _normalise(canvas).view(3, grid.rows, t, grid.cols, t).permute(1, 3, 0, 2, 4)
    tiles = tiles.reshape(grid.rows * grid.cols, 3, t, t)  # [N, 3, t, t], row by row
    if grid.has_global_tile:
        global_tile = _normalise(_resize(pixels, (t, t)))
        tiles = torch.cat([tiles, global_tile[None]])
    return ProcessedImage(pixel_values=tiles, grid=grid)
