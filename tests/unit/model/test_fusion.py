"""Early fusion: Herd's vision tower + text model against transformers' Llama4ForConditionalGeneration.

The reference is initialised by its own init (vision norms and biases then moved off one and zero, as in
test_vision.py), saved with save_pretrained, and loaded by Herd from that directory. Herd places
`tower.image_features(pixels)` at the `<|patch|>` positions; the reference computes the same from
`pixel_values` inside its forward. The negative checks show that the image, and where each of its
features lands, move the logits far beyond the tolerance.

The reference runs under tests.hf_reference.conditional_generation_fixed (a transformers 5.24 bug).
"""

from __future__ import annotations

import pytest
import torch

from herd.model import Llama4Model, load_config, load_model, load_vision
from tests.hf_reference import (
    IMAGE,
    TOKENS_PER_TILE,
    VISION,
    VOCAB,
    build,
    build_multimodal,
    conditional_generation_fixed,
    per_position_rel_error,
    save,
)

TOLERANCE = 1e-4
def prompt(tiles: int, generator: torch.Generator) -> torch.Tensor:
    """Text, then each tile's placeholders between runs of text: crosses several attention chunks."""
    def text(n: int) -> list[int]:
        ids = torch.randint(0, VOCAB - 1, (n,), generator=generator)
        return (ids + (ids >= IMAGE).long()).tolist()  # never the placeholder

    ids = text(5)
    for _ in range(tiles):
        ids += [IMAGE] * TOKENS_PER_TILE + text(3)
    return torch.tensor(ids + text(4))


def pixels(tiles: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(tiles, 3, VISION["image_size"], VISION["image_size"], generator=generator) * 2 - 1


@pytest.fixture(scope="module", autouse=True)
def _reference_forward_returns():
    with conditional_generation_fixed():
        yield


@pytest.fixture(scope="module", params=[0, 1, 2])
def loaded(request, tmp_path_factory):
    seed = request.param
    ref = build_multimodal(seed)
    path = save(ref, tmp_path_factory.mktemp(f"fusion{seed}"))
    return seed, ref, load_model(path, progress=False), load_vision(path)


@torch.no_grad()
def reference_logits(ref, ids: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    return ref(input_ids=ids[None], pixel_values=px).logits[0].float()


def herd_logits(model, tower, ids: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    return model.logits(ids, image_embeds=tower.image_features(px).flatten(0, 1))


@pytest.mark.parametrize("tiles", [1, 3])
def test_logits_match_reference(loaded, tiles):
    seed, ref, model, tower = loaded
    assert model.config.image_token_id == IMAGE
    generator = torch.Generator().manual_seed(50 + seed)
    ids, px = prompt(tiles, generator), pixels(tiles, generator)
    assert int((ids == IMAGE).sum()) == tiles * tower.config.tokens_per_tile
    errors = per_position_rel_error(herd_logits(model, tower, ids, px), reference_logits(ref, ids, px))
    assert errors.max() < TOLERANCE, f"seed {seed}, {tiles} tiles: max rel err {errors.max():.2e}"


def test_the_image_and_its_placement_matter(loaded):
    """Without the image, with other pixels, or with its features in another order, the logits move."""
    seed, ref, model, tower = loaded
    generator = torch.Generator().manual_seed(60 + seed)
    ids, px = prompt(3, generator), pixels(3, generator)
    expected = reference_logits(ref, ids, px)
    features = tower.image_features(px).flatten(0, 1)  # [M, H]
    first = int((ids == IMAGE).nonzero()[0])
    wrong = {
        "text only": model.logits(ids),
        "other pixels": herd_logits(model, tower, ids, pixels(3, generator)),
        "tiles swapped": model.logits(ids, image_embeds=features.roll(TOKENS_PER_TILE, dims=0)),
        "features reversed within tiles": model.logits(
            ids, image_embeds=features.view(3, TOKENS_PER_TILE, -1).flip(1).flatten(0, 1)
        ),
    }
    for what, logits in wrong.items():
        errors = per_position_rel_error(logits, expected)
        assert errors[:first].max() < TOLERANCE, f"{what}: causal, so the text before the image is unchanged"
        assert errors[first:].max() > 100 * TOLERANCE, f"{what}: max rel err only {errors[first:].max():.2e}"


def test_greedy_decoding_matches_reference(loaded):
    seed, ref, model, tower = loaded
    generator = torch.Generator().manual_seed(70 + seed)
    ids, px = prompt(2, generator), pixels(2, generator)
    with torch.no_grad():
        out = ref.generate(input_ids=ids[None], pixel_values=px, max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    expected = out[0, ids.shape[0]:].tolist()
    assert len(expected) == 8
    cache = model.new_cache()
    logits = model(ids, cache=cache, image_embeds=tower.image_features(px).flatten(0, 1))  # the image: prompt only
    generated: list[int] = []
    while len(generated) < 8:
        generated.append(int(torch.argmax(logits[-1])))
        logits = model(torch.tensor(generated[-1:]), cache=cache)
    assert generated == expected


def test_mismatched_image_embeds_are_refused(loaded):
    _, _, model, tower = loaded
    generator = torch.Generator().manual_seed(80)
    ids, px = prompt(2, generator), pixels(2, generator)
    features = tower.image_features(px).flatten(0, 1)  # [8, 64]
    with pytest.raises(ValueError, match=r"8 image placeholder tokens .* but image_embeds has 7 rows"):
        model.logits(ids, image_embeds=features[:7])
    with pytest.raises(ValueError, match=r"8 image placeholder tokens .* but image_embeds has 12 rows"):
        model.logits(ids, image_embeds=torch.cat([features, features[:4]]))
    with pytest.raises(ValueError, match="0 image placeholder tokens"):
        model.logits(ids[ids != IMAGE], image_embeds=features)
    with pytest.raises(ValueError, match=r"image_embeds must be \[image tokens, 64\].*\(8, 32\)"):
        model.logits(ids, image_embeds=features[:, :32])
    with pytest.raises(ValueError, match=r"image_embeds must be \[image tokens, 64\].*\(2, 4, 64\)"):
        model.logits(ids, image_embeds=tower.image_features(px))  # not flattened
    with pytest.raises(ValueError, match="floating point"):
        model.logits(ids, image_embeds=features.long())
    text_only = Llama4Model(model.config.model_copy(update={"image_token_id": None}))
    with pytest.raises(ValueError, match="no image placeholder token"):
        text_only.logits(ids, image_embeds=features)


def test_placeholder_id_comes_from_the_multimodal_config(tmp_path):
    assert load_config(save(build("scout", 0, layout="causal"), tmp_path / "causal")).image_token_id is None
    config = load_config(save(build_multimodal(0), tmp_path / "conditional"))
    assert config.image_token_id == config.text.image_token_id == IMAGE
