"""A checkpoint's image rules: read from its files, one grid for the gateway's header read and the
replica's full decode, placeholder text put where the chat template left each image."""

from __future__ import annotations

import json

import pytest

from herd.model.image_processor import TileGrid, image_prompt
from herd.model.image_prompts import PREPROCESSOR_CONFIG, ImagePrompts
from herd.model.special_tokens import IMAGE
from herd.model.tiny import make_tiny
from tests.hf_reference import build, save
from tests.images import random_png


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def test_the_tiny_checkpoint_carries_llama4_settings(tiny):
    prompts = ImagePrompts.from_pretrained(tiny)
    assert prompts is not None
    assert (prompts.processor.tile_px, prompts.processor.max_tiles, prompts.tokens_per_tile) == (336, 16, 144)
    written = json.loads((tiny / PREPROCESSOR_CONFIG).read_text())
    assert written["size"] == {"height": 336, "width": 336} and written["max_patches"] == 16
    assert written["image_processor_type"] == "Llama4ImageProcessorFast"


def test_a_text_only_checkpoint_takes_no_images(tmp_path):
    assert ImagePrompts.from_pretrained(save(build("scout", 0, layout="causal"), tmp_path)) is None


@pytest.mark.parametrize(("change", "needle"), [
    ({"image_mean": [0.48, 0.46, 0.41]}, "image_mean"),
    ({"resize_to_max_canvas": True}, "resize_to_max_canvas"),
    ({"size": {"height": 448, "width": 448}}, "differs from the vision tower's image_size 336"),
    ({"size": {"height": 336, "width": 448}}, "square"),
])
def test_settings_herd_does_not_implement_are_refused(tiny, tmp_path, change, needle):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", PREPROCESSOR_CONFIG):
        (copy / name).write_text((tiny / name).read_text())
    raw = json.loads((copy / PREPROCESSOR_CONFIG).read_text()) | change
    (copy / PREPROCESSOR_CONFIG).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=needle):
        ImagePrompts.from_pretrained(copy)


@pytest.mark.parametrize(("width", "height"), [(40, 30), (336, 336), (600, 300), (300, 900), (1000, 700)])
def test_the_header_grid_is_the_grid_the_pixels_are_cut_on(tiny, width, height):
    prompts = ImagePrompts.from_pretrained(tiny, max_pixels=10**7)
    assert prompts is not None
    png = random_png(width, height)
    grid = prompts.grid(png)
    tiles = prompts.pixel_values(png)
    assert tiles.shape == (grid.num_tiles, 3, 336, 336)


def test_expand_puts_each_grid_at_its_marker_and_counts_them(tiny):
    prompts = ImagePrompts.from_pretrained(tiny)
    assert prompts is not None
    grids = [TileGrid(1, 1), TileGrid(2, 1)]
    text = prompts.expand(f"a{IMAGE}b{IMAGE}c", grids)
    assert text == f"a{image_prompt(grids[0], 144)}b{image_prompt(grids[1], 144)}c"
    with pytest.raises(ValueError, match=r"2 image markers .* for 1 images"):
        prompts.expand(f"a{IMAGE}b{IMAGE}c", grids[:1])
