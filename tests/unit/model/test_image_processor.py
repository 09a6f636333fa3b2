"""Llama 4 image preprocessing against transformers 5.24.0.

Tested against the reference: the tile-grid choice (the reference's ``find_supported_resolutions`` and
``get_best_fit``, whose module imports torchvision at the top and so cannot be imported here, are
compiled from its source file on their own and run on many image sizes), the prompt layout
(``Llama4Processor._prompt_split_image``), and the pixel values, bit for bit: torchvision cannot be
imported here, so ``tests/data/llama4_pixels/reference.safetensors`` holds the reference's output for a
few PNG images (made by ``generate.py`` beside it, in a side environment with torchvision), whole
tensors for small tiles and a SHA-256 for the real 336-pixel, 16-tile configuration.
"""

from __future__ import annotations

import ast
import hashlib
import io
import math
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.models.llama4 as llama4_pkg
from PIL import Image
from transformers.models.llama4.processing_llama4 import Llama4Processor

from herd.model import image_processor
from herd.model.image_processor import (
    IMAGE_MEAN,
    IMAGE_STD,
    ImageProcessorConfig,
    TileGrid,
    best_fit_grid,
    decode_image,
    image_prompt,
    open_image,
    preprocess,
    supported_grids,
)
from tests.images import Case, golden, golden_cases, png_header_only

CONFIG = ImageProcessorConfig()
REFERENCE_SOURCE = Path(llama4_pkg.__file__).parent / "image_processing_llama4.py"


def _reference_functions() -> dict[str, object]:
    """The reference's grid functions, compiled from its source without its torchvision import."""
    tree = ast.parse(REFERENCE_SOURCE.read_text())
    wanted = {"get_factors", "find_supported_resolutions", "get_best_fit"}
    funcs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert {f.name for f in funcs} == wanted
    namespace: dict[str, object] = {
        "torch": torch,
        "math": math,
        "defaultdict": defaultdict,
        "lru_cache": lru_cache,
        "SizeDict": SimpleNamespace,
    }
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(REFERENCE_SOURCE), "exec"), namespace)
    return namespace


REF = _reference_functions()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- decoding -------------------------------------------------------------------------------------


def test_decode_rgb_png_roundtrips() -> None:
    image = Image.new("RGB", (7, 5), (10, 20, 30))
    decoded = decode_image(_png(image), CONFIG)
    assert decoded.mode == "RGB"
    assert decoded.size == (7, 5)
    assert decoded.getpixel((3, 2)) == (10, 20, 30)


def test_grayscale_becomes_rgb_with_equal_channels() -> None:
    decoded = decode_image(_png(Image.new("L", (4, 4), 77)), CONFIG)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (77, 77, 77)


def test_transparency_is_composited_onto_white() -> None:
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    image.putpixel((1, 0), (200, 0, 0, 255))  # opaque red stays red
    decoded = decode_image(_png(image), CONFIG)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (200, 0, 0)


def test_text_is_not_an_image() -> None:
    with pytest.raises(ValueError, match="not a recognised image"):
        decode_image(b"hello, I am a text file named cat.png\n", CONFIG)


def test_truncated_image_is_refused() -> None:
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    data = _png(noisy)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], CONFIG)


def test_decompression_bomb_is_refused_without_allocating() -> None:
    with pytest.raises(ValueError, match=r"decompression bomb|decompression-bomb"):
        decode_image(png_header_only(20000, 20000), CONFIG)


def test_pixel_limit_is_ours_not_only_pillows() -> None:
    config = ImageProcessorConfig(max_pixels=1000)
    with pytest.raises(ValueError, match="over the maximum of 1000"):
        decode_image(png_header_only(100, 100), config)


def test_side_over_maximum_is_refused() -> None:
    with pytest.raises(ValueError, match="20000x100, over the maximum side of 16384"):
        decode_image(png_header_only(20000, 100), CONFIG)


def _encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "GIF", "WEBP"])
def test_the_accepted_formats_decode(image_format: str) -> None:
    decoded = decode_image(_encoded(Image.new("RGB", (6, 4), (0, 128, 255)), image_format), CONFIG)
    assert decoded.mode == "RGB" and decoded.size == (6, 4)


@pytest.mark.parametrize("image_format", ["BMP", "TIFF", "ICO", "PPM", "TGA", "PCX"])
def test_other_formats_are_refused_naming_the_accepted_ones(image_format: str) -> None:
    """Only the decoders images are sent in are reachable: every other Pillow plugin is attack surface."""
    data = _encoded(Image.new("RGB", (16, 16), (1, 2, 3)), image_format)
    for read in (decode_image, open_image):
        with pytest.raises(ValueError, match=r"not a recognised image .* accepted formats are PNG, JPEG, GIF and WebP"):
            read(data, CONFIG)


def test_bad_config_names_the_value() -> None:
    with pytest.raises(ValueError, match="max_tiles must be positive, got 0"):
        ImageProcessorConfig(max_tiles=0)


# -- tile grid -------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tiles", [1, 4, 5, 16])
def test_supported_grids_in_reference_order(max_tiles: int) -> None:
    size = SimpleNamespace(height=336, width=336)
    reference = REF["find_supported_resolutions"].__wrapped__(max_tiles, size)  # type: ignore[attr-defined]
    ours = [(g.rows * 336, g.cols * 336) for g in supported_grids(max_tiles)]
    assert ours == reference


SIZES = sorted(
    {
        (h, w)
        for h in (1, 13, 100, 223, 335, 336, 337, 500, 672, 673, 1000, 1008, 1344, 2000, 4000)
        for w in (1, 50, 336, 400, 671, 672, 999, 1344, 1345, 3000, 5376, 9000)
    }
    | {(17 * k + 3, 31 * k % 2900 + 7) for k in range(1, 120)}
)


@pytest.mark.parametrize("max_tiles", [4, 16])
def test_best_fit_grid_matches_reference(max_tiles: int) -> None:
    size = SimpleNamespace(height=336, width=336)
    resolutions = torch.tensor(REF["find_supported_resolutions"].__wrapped__(max_tiles, size))  # type: ignore[attr-defined]
    config = ImageProcessorConfig(max_tiles=max_tiles)
    for height, width in SIZES:
        canvas = REF["get_best_fit"]((height, width), resolutions)  # type: ignore[operator]
        expected = TileGrid(int(canvas[0]) // 336, int(canvas[1]) // 336)
        assert best_fit_grid(height, width, config) == expected, (height, width)


def test_best_fit_grid_examples() -> None:
    assert best_fit_grid(336, 336, CONFIG) == TileGrid(1, 1)
    assert best_fit_grid(100, 100, CONFIG) == TileGrid(1, 1)
    assert best_fit_grid(336, 672, CONFIG) == TileGrid(1, 2)
    assert best_fit_grid(1344, 1344, CONFIG) == TileGrid(4, 4)
    assert best_fit_grid(10, 9000, CONFIG).rows * best_fit_grid(10, 9000, CONFIG).cols <= 16


# -- token layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (1, 2), (2, 1), (2, 2), (3, 5), (4, 4), (1, 16)])
@pytest.mark.parametrize("tokens_per_tile", [1, 144])
def test_image_prompt_matches_reference(rows: int, cols: int, tokens_per_tile: int) -> None:
    expected = Llama4Processor._prompt_split_image(None, (rows, cols), tokens_per_tile)  # type: ignore[arg-type]
    assert image_prompt(TileGrid(rows, cols), tokens_per_tile) == expected


def test_single_tile_prompt_has_no_separators() -> None:
    assert image_prompt(TileGrid(1, 1), 2) == "<|image_start|><|image|><|patch|><|patch|><|image_end|>"


# -- pixel values -------------------------------------------------------------------------------------


def test_normalisation_constants_match_reference() -> None:
    source = REFERENCE_SOURCE.read_text()
    assert "image_mean = [0.5, 0.5, 0.5]" in source
    assert "image_std = [0.5, 0.5, 0.5]" in source
    assert 'size = {"height": 336, "width": 336}' in source
    assert "max_patches = 16" in source
    assert IMAGE_MEAN == (0.5, 0.5, 0.5)
    assert IMAGE_STD == (0.5, 0.5, 0.5)


def test_single_tile_shape_and_range() -> None:
    out = preprocess(Image.new("RGB", (200, 100), (255, 0, 128)), CONFIG)
    assert out.grid == TileGrid(1, 1)
    assert out.pixel_values.shape == (1, 3, 336, 336)
    assert out.pixel_values.dtype == torch.bfloat16
    values = out.pixel_values.float()
    assert values.min() >= -1 and values.max() <= 1
    # Small images are not upscaled past the tile: 200x100 stays at 200x100... then pads with black.
    assert values[0, 0, 50, 150].item() == pytest.approx(1.0)
    assert values[0, 1, 50, 150].item() == pytest.approx(-1.0)
    assert values[0, :, 200, 300].tolist() == [-1.0, -1.0, -1.0]


def test_tiles_are_row_by_row_then_global() -> None:
    # A 672x672 image of four coloured quadrants -> a 2x2 grid; tile i carries quadrant i's colour.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    image = Image.new("RGB", (672, 672))
    for i, colour in enumerate(colours):
        row, col = divmod(i, 2)
        image.paste(colour, (col * 336, row * 336, col * 336 + 336, row * 336 + 336))
    out = preprocess(image, CONFIG)
    assert out.grid == TileGrid(2, 2)
    assert out.grid.num_tiles == 5
    assert out.pixel_values.shape == (5, 3, 336, 336)
    for i, colour in enumerate(colours):
        expected = torch.tensor([c / 255 * 2 - 1 for c in colour])
        assert torch.allclose(out.pixel_values[i, :, 168, 168].float(), expected, atol=1e-2), i
    # The global tile is the whole image squashed: top-left quadrant red, bottom-right white.
    global_tile = out.pixel_values[4].float()
    assert torch.allclose(global_tile[:, 40, 40], torch.tensor([1.0, -1.0, -1.0]), atol=1e-2)
    assert torch.allclose(global_tile[:, 300, 300], torch.tensor([1.0, 1.0, 1.0]), atol=1e-2)


def test_wide_image_is_padded_at_the_bottom() -> None:
    out = preprocess(Image.new("RGB", (1000, 300), (255, 255, 255)), CONFIG)
    grid = out.grid
    assert grid.rows * grid.cols > 1
    assert out.pixel_values.shape == (grid.num_tiles, 3, 336, 336)
    last_row_first_tile = out.pixel_values[(grid.rows - 1) * grid.cols].float()
    assert last_row_first_tile[:, -1, 0].tolist() == [-1.0, -1.0, -1.0]  # black padding
    assert out.pixel_values[0, :, 0, 0].float().tolist() == [1.0, 1.0, 1.0]


# -- pixel values against the reference ----------------------------------------------------------

def _preprocess_golden(case: Case) -> image_processor.ProcessedImage:
    """Herd's decoding and preprocessing of one golden case's PNG, with the case's tile size and count."""
    config = ImageProcessorConfig(tile_px=case["tile_px"], max_tiles=case["max_tiles"])
    png = golden()[1][f"{case['name']}.png"].numpy().tobytes()
    return preprocess(decode_image(png, config), config)


def _sha256(pixel_values: torch.Tensor) -> str:
    """As ``generate.py`` hashes: the tensor's bytes, row-major, native bfloat16."""
    return hashlib.sha256(pixel_values.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_golden_file_is_from_the_reference_we_pin() -> None:
    metadata, tensors = golden()
    assert metadata["transformers"] == "5.24.0"
    assert metadata["processor"] == "transformers.Llama4ImageProcessor"
    for case in golden_cases(stored=True):
        reference = tensors[f"{case['name']}.pixel_values"]
        assert reference.dtype == torch.bfloat16
        assert _sha256(reference) == case["sha256"], case["name"]
    assert {case["tile_px"] for case in golden_cases(stored=False)} == {336}


@pytest.mark.parametrize("case", golden_cases(stored=True), ids=lambda case: case["name"])
def test_pixels_equal_reference(case: Case) -> None:
    tensors = golden()[1]
    reference = tensors[f"{case['name']}.pixel_values"]  # [N(+1), 3, t, t] bfloat16
    out = _preprocess_golden(case)
    assert [out.grid.rows, out.grid.cols] == tensors[f"{case['name']}.aspect_ratios"][0].tolist()
    assert out.pixel_values.dtype == reference.dtype
    assert out.pixel_values.shape == reference.shape
    diff = (out.pixel_values.float() - reference.float()).abs()
    assert torch.equal(out.pixel_values, reference), f"{int((diff > 0).sum())} values differ, max {diff.max()}"


@pytest.mark.parametrize("case", golden_cases(stored=False), ids=lambda case: case["name"])
def test_pixels_equal_reference_in_the_real_configuration(case: Case) -> None:
    out = _preprocess_golden(case)
    assert [out.grid.rows, out.grid.cols] == case["grid"]
    assert list(out.pixel_values.shape) == case["shape"]
    assert _sha256(out.pixel_values) == case["sha256"]


def test_golden_pixels_tell_float_resizing_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resizing in float and rounding (torchvision off AVX2/AVX512 CPUs) must fail the comparison above."""

    def float_resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) == size:
            return pixels
        resized = torch.nn.functional.interpolate(pixels[None].float(), size=size, mode="bilinear", antialias=True)
        return resized[0].round().clamp(0, 255).to(torch.uint8)

    monkeypatch.setattr(image_processor, "_resize", float_resize)
    for case in golden_cases(stored=True):
        reference = golden()[1][f"{case['name']}.pixel_values"]
        assert not torch.equal(_preprocess_golden(case).pixel_values, reference), case["name"]
