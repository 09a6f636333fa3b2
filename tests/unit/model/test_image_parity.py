"""From image bytes to logits, Herd against transformers, on images of several sizes and aspect ratios.

Each golden case (tests/data/llama4_pixels) is a PNG and transformers' Llama4ImageProcessor output for
it with 56-pixel tiles. The reference Llama4ForConditionalGeneration (4 features per tile) runs on that
output (cast to float32, as Herd's tower casts pixels to its weights' dtype); Herd decodes the PNG
itself, preprocesses it, encodes it with its own vision tower and places the features. The prompt is
Herd's layout of the case's grid, with the tiny vocabulary's ids: pixels, vision features and logits
must agree (float32, relative error < 1e-4), and so must greedy generation.
"""

from __future__ import annotations

import pytest
import torch

from herd.model import load_model, load_vision
from herd.model.image_processor import ImageProcessorConfig, TileGrid, decode_image, preprocess
from tests.hf_reference import (
    IMAGE,
    TOKENS_PER_TILE,
    VISION,
    VOCAB,
    build_multimodal,
    conditional_generation_fixed,
    per_position_rel_error,
    save,
)
from tests.images import Case, golden, golden_cases

TOLERANCE = 1e-4
# Ids of the layout's other special tokens inside the tiny vocabulary (any ids other than the placeholder).
START, END, X_SEP, Y_SEP, GLOBAL = 251, 252, 253, 254, 255
CASES = [c for c in golden_cases(stored=True) if c["tile_px"] == VISION["image_size"]]


@pytest.fixture(scope="module", params=[0, 1])
def models(request, tmp_path_factory):
    with conditional_generation_fixed():
        reference = build_multimodal(request.param)
        path = save(reference, tmp_path_factory.mktemp(f"image-parity{request.param}"))
        yield request.param, reference, load_model(path, progress=False), load_vision(path)


def _layout(grid: TileGrid) -> list[int]:
    """Herd's image prompt (image_processor.image_prompt) in tiny-vocabulary ids."""
    tile = [IMAGE] * TOKENS_PER_TILE
    ids = [START]
    if grid.has_global_tile:
        for _ in range(grid.rows):
            for col in range(grid.cols):
                ids += ([X_SEP] if col else []) + tile
            ids.append(Y_SEP)
    return [*ids, GLOBAL, *tile, END]


def _prompt(grid: TileGrid, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, VOCAB - 60, (9,), generator=generator).tolist()  # below every id used above
    return torch.tensor(text[:5] + _layout(grid) + text[5:])


def _herd_pixels(case: Case) -> tuple[torch.Tensor, TileGrid]:
    config = ImageProcessorConfig(tile_px=case["tile_px"], max_tiles=case["max_tiles"])
    processed = preprocess(decode_image(golden()[1][f"{case['name']}.png"].numpy().tobytes(), config), config)
    return processed.pixel_values, processed.grid


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['name']}-{c['grid'][0]}x{c['grid'][1]}")
def test_bytes_to_logits_match_the_reference(models, case):
    seed, reference, model, tower = models
    reference_pixels = golden()[1][f"{case['name']}.pixel_values"]  # what transformers' processor gives
    pixels, grid = _herd_pixels(case)
    assert torch.equal(pixels, reference_pixels)
    assert [grid.rows, grid.cols] == case["grid"]
    features = tower.image_features(pixels).flatten(0, 1)  # [M, H]
    with torch.no_grad():
        encoded = reference.get_image_features(reference_pixels.float(), return_dict=True).last_hidden_state
        expected_features = reference.multi_modal_projector(encoded.reshape(-1, encoded.shape[-1]))
    assert (features - expected_features).norm() / expected_features.norm() < TOLERANCE
    ids = _prompt(grid, seed)
    assert int((ids == IMAGE).sum()) == features.shape[0] == grid.num_tiles * TOKENS_PER_TILE
    with conditional_generation_fixed(), torch.no_grad():
        expected = reference(input_ids=ids[None], pixel_values=reference_pixels.float()).logits[0].float()
    errors = per_position_rel_error(model.logits(ids, image_embeds=features), expected)
    assert errors.max() < TOLERANCE, f"{case['name']}: max rel err {errors.max():.2e}"


@pytest.mark.parametrize("name", ["grid_2x3_padded", "tall_6x1", "small_upscaled"])
def test_greedy_generation_from_bytes_matches_the_reference(models, name):
    seed, reference, model, tower = models
    [case] = [c for c in CASES if c["name"] == name]
    pixels, grid = _herd_pixels(case)
    ids = _prompt(grid, 100 + seed)
    with conditional_generation_fixed(), torch.no_grad():
        out = reference.generate(input_ids=ids[None], pixel_values=golden()[1][f"{name}.pixel_values"].float(),
                                 max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    cache = model.new_cache()
    logits = model(ids, cache=cache, image_embeds=tower.image_features(pixels).flatten(0, 1))
    generated: list[int] = []
    while len(generated) < 8:
        generated.append(int(torch.argmax(logits[-1])))
        logits = model(torch.tensor(generated[-1:]), cache=cache)
    assert generated == out[0, ids.shape[0]:].tolist()
